"""No store call runs on the event loop: every route, the lifespan and the engine reach the store from worker
threads (a slow disk or a remote index must never stall the other requests)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from http_testkit import ADMIN_KEY, BERT_TARGETS, bearer, make_adapter, make_settings, peft_files

import service.app as app_module
from service.app import create_app


class OffLoop:
    """Forwards to the store (and to its index and blob store), noting every call and any made on an event loop."""

    def __init__(self, target: Any, calls: list[str], on_loop: list[str]) -> None:
        self._target, self._calls, self._on_loop = target, calls, on_loop

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._target, name)
        if name in ("index", "blobs"):
            return OffLoop(value, self._calls, self._on_loop)
        if not callable(value):
            return value

        def call(*args, **kwargs):
            self._calls.append(name)
            try:
                asyncio.get_running_loop()
                self._on_loop.append(f"{name} on {threading.current_thread().name}")
            except RuntimeError:
                pass  # no running loop in this thread: a worker (or the engine's loop thread)
            return value(*args, **kwargs)

        return call


@pytest.mark.local_store
def test_no_store_call_runs_on_the_event_loop(model_dirs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    calls: list[str] = []
    on_loop: list[str] = []
    real_open = app_module.open_store
    monkeypatch.setattr(app_module, "open_store", lambda settings: OffLoop(real_open(settings), calls, on_loop))
    app = create_app(make_settings(model_dirs["bert"], tmp_path / "store"))
    with TestClient(app, headers=bearer(ADMIN_KEY)) as client:
        assert client.put("/v1/adapters/a", files=peft_files(make_adapter(BERT_TARGETS, seed=1))).status_code == 201
        assert client.put("/v1/adapters/a", files=peft_files(make_adapter(BERT_TARGETS))).status_code == 409
        assert client.get("/v1/adapters").json()["total"] == 1
        assert client.get("/v1/adapters/a").status_code == 200
        assert client.get("/v1/adapters/nope").status_code == 404
        assert client.get("/v1/adapters/a/files/adapter_config.json").status_code == 200
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["base", "a"]
        assert client.get("/v1/models/a").status_code == 200
        assert client.post("/v1/embeddings", json={"model": "a", "input": "hello"}).status_code == 200
        composed = client.post("/v1/compose", json={"name": "c", "adapters": [{"name": "a", "weight": 0.5}]})
        assert composed.status_code == 201, composed.text
        assert client.delete("/v1/adapters/c").status_code == 200
    assert {"exists", "put", "list", "count", "get", "read_file", "load_weights", "delete", "close"} <= set(calls)
    assert {"get_meta", "collect_garbage"} <= set(calls)  # the lifespan's claim and collection, too
    assert on_loop == []
