"""The real server, as users start it: `python -m service ...` in a subprocess on 127.0.0.1, driven over HTTP.

Upload an adapter, run inference with it, merge, run it again (same answer), unmerge (the base weights
come back bit for bit), stream, and refuse an oversized streamed upload. The process is always killed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))
from http_testkit import GPT2_TARGETS, build_gpt2, make_adapter, peft_files  # noqa: E402
from infra import free_port, wait_http_ready

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
ADMIN, INFER = "e2e-admin-key-0123456789", "e2e-infer-key-0123456789"
READY_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("e2e")
    base = build_gpt2(root / "gpt2")
    port = free_port()
    log = open(root / "server.log", "w+b")  # noqa: SIM115 - closed in the finally
    env = {**os.environ, "LORA_ADMIN_KEYS": ADMIN, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port), "--store", str(root / "store"),
         "--base-model", str(base), "--inference-keys", INFER, "--max-upload-bytes", "256KiB", "--max-wait-ms", "2"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http_ready(url, proc, READY_TIMEOUT_S, lambda: _tail(log))
        yield url
        proc.send_signal(signal.SIGTERM)  # graceful: the lifespan stops the engine and closes the store
        # uvicorn re-raises the signal once it has shut down, so -SIGTERM is a clean exit too
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM), _tail(log)
        assert "Application shutdown complete" in _tail(log)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        log.close()


def _tail(log) -> str:
    log.flush()
    log.seek(0)
    return log.read().decode(errors="replace")[-4000:]


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_upload_infer_merge_infer_unmerge(server: str):
    with httpx.Client(base_url=server, timeout=60) as http:
        weights = make_adapter(GPT2_TARGETS, rank=4, seed=5, scale=2.0, fan_in_fan_out=True)
        r = http.put("/v1/adapters/e2e-adapter", files=peft_files(weights), headers=_auth(ADMIN))
        assert r.status_code == 201, r.text
        assert http.put("/v1/adapters/e2e-adapter", files=peft_files(weights), headers=_auth(INFER)).status_code == 403

        request = {"model": "e2e-adapter", "prompt": "hello world", "max_tokens": 6, "temperature": 0, "logprobs": 1}
        unmerged = http.post("/v1/completions", json=request, headers=_auth(INFER))
        assert unmerged.status_code == 200, unmerged.text
        base = http.post("/v1/completions", json={**request, "model": "base"}, headers=_auth(INFER)).json()
        assert base["choices"][0]["logprobs"] != unmerged.json()["choices"][0]["logprobs"]

        def state() -> dict:  # merge and unmerge answer without fingerprints; they are hashed on request
            return http.get("/v1/state", params={"fingerprints": "true"}, headers=_auth(ADMIN)).json()

        before = state()
        assert before["fingerprint"] == before["pristine_fingerprint"]
        assert http.post("/v1/adapters/e2e-adapter/merge", headers=_auth(ADMIN)).status_code == 200
        merged = state()
        assert merged["merged_adapter"] == "e2e-adapter" and merged["fingerprint"] != merged["pristine_fingerprint"]

        again = http.post("/v1/completions", json=request, headers=_auth(INFER)).json()["choices"][0]
        assert again["text"] == unmerged.json()["choices"][0]["text"]
        assert again["logprobs"]["token_logprobs"] == pytest.approx(
            unmerged.json()["choices"][0]["logprobs"]["token_logprobs"], abs=1e-4)

        assert http.post("/v1/unmerge", headers=_auth(ADMIN)).status_code == 200
        after = state()
        assert after["merged_adapter"] is None
        assert after["fingerprint"] == after["pristine_fingerprint"] == merged["pristine_fingerprint"]
        assert http.post("/v1/completions", json={**request, "model": "base"}, headers=_auth(INFER)).json()[
            "choices"] == base["choices"]


def test_streaming_completion(server: str):
    body = {"model": "base", "prompt": "the quick", "max_tokens": 5, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, headers=_auth(INFER), timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][len("data: "):])["choices"][0]["finish_reason"] in ("stop", "length")


def test_oversized_streamed_upload_is_413(server: str):
    def body() -> Iterator[bytes]:
        yield b"--b\r\nContent-Disposition: form-data; name=\"adapter\"\r\n\r\n"
        for _ in range(64):  # 4 MiB against a 256 KiB limit, chunked: no Content-Length to check
            yield b"\0" * 65536

    try:
        r = httpx.put(f"{server}/v1/adapters/too-big", content=body(), timeout=60,
                      headers={**_auth(ADMIN), "Content-Type": "multipart/form-data; boundary=b"})
        assert r.status_code == 413 and r.json()["error"]["type"] == "payload_too_large"
    except httpx.WriteError:
        pass  # the server answered 413 and closed the connection while the client was still sending
    assert httpx.get(f"{server}/v1/adapters/too-big", headers=_auth(ADMIN)).status_code == 404


def test_auth_and_metrics(server: str):
    r = httpx.get(f"{server}/v1/models")
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{server}/healthz").json() == {"status": "ok"}
    metrics = httpx.get(f"{server}/metrics").text
    assert "lora_http_requests_total" in metrics and "lora_adapter_loads_total" in metrics
