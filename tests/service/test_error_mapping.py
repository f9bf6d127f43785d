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
from service.store import AdapterExistsError, InvalidAdapterNameError


@pytest.mark.parametrize("exc,status", [
    (UnknownAdapterError("x"), 404), (AdapterExistsError("x"), 409), (InvalidAdapterNameError("x"), 422),
    (AdapterFormatError("x"), 422), (UnsupportedAdapterError("x"), 422), (AdapterMismatchError("x"), 422),
    (AdapterTooLargeError("x"), 422), (MergeError("x"), 422), (WrongTaskError("x"), 400),
    (BadRequestError("x"), 400), (EngineBusyError("x"), 503), (BadRequest("x"), 400), (PayloadTooLarge("x"), 413),
    (UnsupportedMediaType("x"), 415), (NotReady("x"), 503), (RuntimeError("x"), 500),
])
def test_status_of(exc: Exception, status: int):
    assert status_of(exc) == status


def test_error_body_names_the_key():
    body = error_body(AdapterMismatchError("shape (4, 16), expected (4, 32)", key="base_model.model.q.lora_A.weight"))
    assert body == {"error": {"message": "shape (4, 16), expected (4, 32)", "type": "adapter_mismatch_error",
                              "key": "base_model.model.q.lora_A.weight"}}
    assert error_body(UnknownAdapterError("adapter 'x' not found", key="x"))["error"]["message"] == \
        "adapter 'x' not found"


def test_framework_errors_use_the_same_shape(bert_client: TestClient):
    r = bert_client.get("/v2/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = bert_client.patch("/v1/adapters")
    assert r.status_code == 405 and set(r.json()["error"]) == {"message", "type", "key"}
    r = bert_client.post("/v1/embeddings", content=b"not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["type"] == "validation_error"
    r = bert_client.post("/v1/embeddings", json={"model": "base", "input": 5})
    assert r.status_code == 422 and r.json()["error"]["key"].startswith("input")
