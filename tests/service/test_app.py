"""service/app.py: the lifespan starts and stops everything; a restart on the same store serves the same
adapters; the OpenAPI schema describes every route, its bodies and its errors."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from http_testkit import ADMIN_KEY, GPT2_TARGETS, bearer, make_adapter, make_settings, peft_files

from service.app import create_app


@pytest.mark.local_store
def test_restart_on_the_same_store(model_dirs, tmp_path: Path):
    settings = make_settings(model_dirs["gpt2"], tmp_path)
    request = {"model": "kept", "prompt": "hello", "max_tokens": 5, "temperature": 0, "logprobs": 1}
    with TestClient(create_app(settings), headers=bearer(ADMIN_KEY)) as client:
        info = client.put("/v1/adapters/kept", files=peft_files(make_adapter(GPT2_TARGETS, fan_in_fan_out=True)))
        assert info.status_code == 201
        first = client.post("/v1/completions", json=request).json()["choices"]
    (tmp_path / "tmp" / "0123abcd").mkdir()  # as if an upload had been interrupted by a crash (just now)...
    stale = tmp_path / "tmp" / "4567cdef"  # ...and another, two hours ago
    stale.mkdir()
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    with TestClient(create_app(settings), headers=bearer(ADMIN_KEY)) as client:
        assert client.get("/v1/adapters/kept").json() == info.json()
        assert client.get("/v1/adapters").json()["total"] == 1
        assert client.post("/v1/completions", json=request).json()["choices"] == first
        # the start's collection removes leftovers older than its grace (an hour), never a write in progress
        assert [p.name for p in (tmp_path / "tmp").iterdir()] == ["0123abcd"]


def test_a_base_model_that_cannot_load_stops_startup(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    app = create_app(make_settings(tmp_path / "empty", tmp_path / "store"))
    with pytest.raises(ValueError, match="config.json"), TestClient(app):
        pass
    assert app.state.engine is None and app.state.store is None


def test_openapi_describes_routes_bodies_and_errors(bert_client: TestClient):
    schema = bert_client.get("/openapi.json").json()
    paths = schema["paths"]
    expected = {
        "/v1/adapters/{name}": {"put", "get", "delete"}, "/v1/adapters": {"get"},
        "/v1/adapters/{name}/files/{filename}": {"get"}, "/v1/adapters/{name}/merge": {"post"},
        "/v1/unmerge": {"post"}, "/v1/state": {"get"}, "/v1/compose": {"post"}, "/v1/completions": {"post"},
        "/v1/embeddings": {"post"}, "/v1/classify": {"post"}, "/v1/models": {"get"}, "/healthz": {"get"},
        "/readyz": {"get"}, "/metrics": {"get"},
    }
    for path, methods in expected.items():
        assert methods <= set(paths[path]), path
    upload = paths["/v1/adapters/{name}"]["put"]
    assert "multipart/form-data" in upload["requestBody"]["content"]
    assert {"201", "400", "401", "403", "409", "413", "415", "422"} <= set(upload["responses"])
    assert upload["responses"]["409"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert paths["/v1/compose"]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ComposeRequest")
    assert "bearer" in str(schema["components"]["securitySchemes"]).lower()
    assert "404" in paths["/v1/embeddings"]["post"]["responses"]
    # every 422 is described as the service's own error body, never FastAPI's {"detail": [...]}
    for path, operations in paths.items():
        for method, operation in operations.items():
            if "422" in operation.get("responses", {}):
                ref = operation["responses"]["422"]["content"]["application/json"]["schema"]["$ref"]
                assert ref.endswith("/ErrorResponse"), (method, path)
