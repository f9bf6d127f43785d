"""`--upload`: put a trained PEFT directory into a running lora-service.

    PUT {url}/v1/adapters/{name}     multipart: adapter_config.json, adapter_model.safetensors
    Authorization: Bearer {api_key}  (when a key is given; uploads need an admin key)

The service validates the adapter against its own base model before storing it, so a 2xx answer
means it is servable. Anything else becomes an UploadError carrying the service's own message.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from adapters.serialization import CONFIG_NAME, WEIGHTS_NAME

__all__ = ["UploadError", "UploadEnvironment", "check_upload_target", "upload_adapter"]


class UploadEnvironment(BaseSettings):
    """What lora-train reads from the environment, in one place: `LORA_API_KEY`, the key for --upload when
    --api-key is not given (a flag would show the key in `ps` and in shell history)."""

    model_config = SettingsConfigDict(env_prefix="LORA_", extra="ignore")

    api_key: SecretStr | None = None


class UploadError(RuntimeError):
    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def _detail(response: Any) -> str:
    """The service's own message: {"error": {"message", "type", "code", "param", ...}} here, {"detail": ...}
    elsewhere."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:2000] or "(empty body)"
    error = body.get("error", body.get("detail")) if isinstance(body, dict) else None
    if isinstance(error, dict) and "message" in error:
        extra = ", ".join(f"{k}={error[k]}" for k in ("type", "code", "key") if error.get(k))
        return f"{error['message']} ({extra})" if extra else str(error["message"])
    if isinstance(error, str):
        return error
    return json.dumps(body)


def check_upload_target(url: str, name: str, *, api_key: str | None = None, overwrite: bool = False,
                        timeout: float = 30.0) -> None:
    """Before training, so that a run is not wasted: the service answers, the key may upload (an admin-only
    read, /v1/state), and the name is free or --overwrite was given. Changes nothing on the service."""
    import httpx

    base = url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    hints = {401: " (missing or wrong --api-key)", 403: " (the key may not upload: use an admin key)"}
    try:
        state = httpx.get(f"{base}/v1/state", headers=headers, timeout=timeout)
        if not state.is_success:
            raise UploadError(f"the service at {base} refused the key before training: HTTP {state.status_code}"
                              f"{hints.get(state.status_code, '')}: {_detail(state)}", status=state.status_code)
        existing = httpx.get(f"{base}/v1/adapters/{quote(name, safe='')}", headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        raise UploadError(f"cannot reach the service at {base}: {type(exc).__name__}: {exc}") from exc
    if existing.status_code == 200 and not overwrite:
        raise UploadError(f"adapter {name!r} already exists on {base}: pass --overwrite to store a new version",
                          status=409)
    if existing.status_code not in (200, 404):
        raise UploadError(f"the service at {base} answered HTTP {existing.status_code} for adapter {name!r} before "
                          f"training: {_detail(existing)}", status=existing.status_code)


def upload_adapter(url: str, name: str, adapter_dir: str | Path, *, api_key: str | None = None,
                   overwrite: bool = False, timeout: float = 120.0) -> Any:
    """Upload and return the service's JSON answer (the stored adapter's metadata)."""
    import httpx  # only an uploading run needs it

    adapter_dir = Path(adapter_dir)
    files = {}
    for fname, ctype in ((CONFIG_NAME, "application/json"), (WEIGHTS_NAME, "application/octet-stream")):
        path = adapter_dir / fname
        if not path.is_file():
            raise UploadError(f"{path} is missing; only a LoRA run (--mode lora) writes an uploadable adapter")
        files[fname] = (fname, path.read_bytes(), ctype)
    endpoint = f"{url.rstrip('/')}/v1/adapters/{quote(name, safe='')}"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.put(endpoint, files=files, headers=headers, timeout=timeout,
                             params={"overwrite": "true"} if overwrite else None)
    except httpx.HTTPError as exc:
        raise UploadError(f"cannot reach the service at {endpoint}: {type(exc).__name__}: {exc}") from exc
    if not response.is_success:
        hint = {401: " (missing or wrong --api-key)", 403: " (the key may not upload: use an admin key)",
                409: " (the name exists: pass --overwrite to store a new version)"}.get(response.status_code, "")
        raise UploadError(f"upload to {endpoint} failed: HTTP {response.status_code}{hint}: {_detail(response)}",
                          status=response.status_code)
    try:
        return response.json()
    except ValueError:
        return response.text
