"""service/errors.py: one JSON error shape; each domain error class maps to one status."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from adapters import (
    AdapterFormatError,
    AdapterMismatchError,
    AdapterTooLargeError,
    MergeError,
    UnknownAdapterError,
    UnsupportedAdapterError,
)
from service.engine import BadRequestError, EngineBusyError, WrongTaskError
from service.errors import BadRequest, NotReady, PayloadTooLarge, UnsupportedMediaType, error_body, status_of
from service.storage import AdapterExistsError, InvalidAdapterNameError, MissingBlobError, StorageUnavailableError


@pytest.mark.parametrize("exc,status", [
    (UnknownAdapterError("x"), 404), (AdapterExistsError("x"), 409), (InvalidAdapterNameError("x"), 422),
    (AdapterFormatError("x"), 422), (UnsupportedAdapterError("x"), 422), (AdapterMismatchError("x"), 422),
    (AdapterTooLargeError("x"), 422), (MergeError("x"), 422), (WrongTaskError("x"), 400),
    (BadRequestError("x"), 400), (EngineBusyError("x"), 503), (BadRequest("x"), 400), (PayloadTooLarge("x"), 413),
    (UnsupportedMediaType("x"), 415), (NotReady("x"), 503), (RuntimeError("x"), 500), (MissingBlobError("x"), 500),
    (StorageUnavailableError("index", "x"), 503),
])
def test_status_of(exc: Exception, status: int):
    assert status_of(exc) == status


def test_error_body_names_the_key():
    body = error_body(AdapterMismatchError("shape (4, 16), expected (4, 32)", key="base_model.model.q.lora_A.weight"))
    assert body == {"error": {"message": "shape (4, 16), expected (4, 32)", "type": "adapter_mismatch_error",
                              "param": "base_model.model.q.lora_A.weight", "code": "adapter_mismatch",
                              "key": "base_model.model.q.lora_A.weight"}}
    assert error_body(UnknownAdapterError("adapter 'x' not found", key="x"))["error"]["message"] == \
        "adapter 'x' not found"


def test_framework_errors_use_the_same_shape(bert_client: TestClient):
    r = bert_client.get("/v2/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = bert_client.patch("/v1/adapters")
    assert r.status_code == 405 and set(r.json()["error"]) == {"message", "type", "param", "code", "key"}
    r = bert_client.post("/v1/embeddings", content=b"not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["type"] == "validation_error"
    r = bert_client.post("/v1/embeddings", json={"model": "base", "input": 5})
    assert r.status_code == 422 and r.json()["error"]["key"] == "input"  # no union-branch tags ("input.str")
    r = bert_client.post("/v1/embeddings", json={"model": "base", "input": []})
    assert r.status_code == 422 and r.json()["error"]["key"] == "input"
    r = bert_client.post("/v1/embeddings", content=b'{"model": "base", "input": "x",}',
                         headers={"Content-Type": "application/json"})
    error = r.json()["error"]
    assert r.status_code == 422 and error["key"] is None and "not valid JSON (at character 31)" in error["message"]


@pytest.mark.parametrize(("path", "extra", "field"), [
    ("/v1/completions", {"echo": True}, "echo"),
    ("/v1/completions", {"best_of": 3}, "best_of"),
    ("/v1/completions", {"logit_bias": {"5": 1.0}}, "logit_bias"),
    ("/v1/completions", {"presence_penalty": 0.5}, "presence_penalty"),
    ("/v1/completions", {"suffix": "!"}, "suffix"),
    ("/v1/completions", {"temprature": 0.5}, "temprature"),  # a typo is not silently ignored either
    ("/v1/embeddings", {"dimensions": 8}, "dimensions"),
    ("/v1/classify", {"top_k": 2}, "top_k"),
])
def test_parameters_the_service_does_not_implement_are_refused(bert_client: TestClient, gpt2_client: TestClient,
                                                               path: str, extra: dict, field: str):
    client = gpt2_client if path == "/v1/completions" else bert_client
    body = {"model": "base", "prompt": "hi", "max_tokens": 1} if path == "/v1/completions" else \
        {"model": "base", "input": "hi"}
    r = client.post(path, json={**body, **extra})
    assert r.status_code == 422 and r.json()["error"]["key"] == field, r.text


def test_neutral_values_of_unimplemented_openai_parameters_are_accepted(bert_client, gpt2_client):
    neutral = {"echo": False, "best_of": 1, "logit_bias": {}, "presence_penalty": 0, "frequency_penalty": 0.0,
               "suffix": None, "n": 1, "user": "u"}
    r = gpt2_client.post("/v1/completions", json={"model": "base", "prompt": "hi", "max_tokens": 1, **neutral})
    assert r.status_code == 200, r.text
    r = bert_client.post("/v1/embeddings", json={"model": "base", "input": "hi", "dimensions": 32})
    assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 32


def test_a_row_whose_files_are_missing_is_500_not_404(bert_client: TestClient, unique: str):
    """A damaged store (blob deleted by hand) is the server's fault, and the name still exists: 500, say why."""
    from http_testkit import BERT_TARGETS, make_adapter, peft_files

    sha = bert_client.put(f"/v1/adapters/{unique}", files=peft_files(make_adapter(BERT_TARGETS))).json()["sha256"]
    bert_client.app.state.store.blobs.delete(sha)
    r = bert_client.get(f"/v1/adapters/{unique}/files/adapter_model.safetensors")
    assert r.status_code == 500 and r.json()["error"]["type"] == "missing_blob_error"
    assert "missing" in r.json()["error"]["message"] and r.json()["error"]["key"] == unique
    assert bert_client.get(f"/v1/adapters/{unique}").status_code == 200  # the row is kept (and listed)
    assert bert_client.delete(f"/v1/adapters/{unique}").status_code == 200  # and can be removed


def test_a_forward_that_fails_is_a_500_logged_once(bert_client: TestClient, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug in the forward")

    monkeypatch.setattr("service.engine.batch.embed_rows", broken)
    with caplog.at_level("ERROR"):
        r = bert_client.post("/v1/embeddings", json={"model": "base", "input": ["x"]})
    assert r.status_code == 500 and r.json()["error"]["type"] == "internal_engine_error"
    logged = [rec for rec in caplog.records if rec.exc_info
              and "a bug in the forward" in f"{rec.exc_info[1]} {rec.exc_info[1].__cause__}"]
    assert len(logged) == 1  # with its traceback, where the forward failed; not again by the HTTP layer
