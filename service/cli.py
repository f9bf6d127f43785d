"""`lora-serve` (also `python -m service`): read the settings, then run the app under one uvicorn worker.

    lora-serve                                   # the packaged MiniLM on 127.0.0.1:8000, store ./store/<model>-<id>
    lora-serve --base-model ./gpt2 --admin-keys "$ADMIN_KEY" --inference-keys "$INFER_KEY"
    lora-serve --replicas 2                      # a cluster on Ray Serve (pip install .[cluster]), same API
    lora-serve --help                            # every setting, with its LORA_* variable
"""

from __future__ import annotations

import logging
import sys

from pydantic import ValidationError
from pydantic_settings import SettingsError

from service.settings import Settings

__all__ = ["main", "parse_settings"]


def parse_settings(argv: list[str]) -> Settings:
    """Flags over LORA_* variables over defaults. Raises ValidationError/SettingsError; --help exits."""
    return Settings(_cli_parse_args=argv)


def _describe(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        where = ".".join(str(p) for p in error["loc"]).replace("_", "-")
        message = error["msg"].removeprefix("Value error, ")
        lines.append(f"  --{where}: {message}" if where else f"  {message}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        settings = parse_settings(argv)
    except ValidationError as exc:
        print(f"lora-serve: refusing to start:\n{_describe(exc)}", file=sys.stderr)
        return 2
    except SettingsError as exc:
        print(f"lora-serve: refusing to start: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.cluster_mode:
        return _run_cluster(settings)
    import uvicorn  # after the settings, so --help and bad flags answer at once

    from service.app import create_app

    # One worker, always (Settings refuses any other count): the process owns the weights.
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, workers=1,
                log_level=settings.log_level)
    return 0


def _run_cluster(settings: Settings) -> int:
    """--replicas > 1 or --ray-address: the same API on Ray Serve (service/cluster)."""
    try:
        from service.cluster.launch import run_cluster
    except ImportError as exc:
        print(f"lora-serve: cluster mode needs Ray Serve ({exc}); install it with: pip install '.[cluster]'",
              file=sys.stderr)
        return 2
    return run_cluster(settings)
