"""What the cluster tests do over HTTP: upload an adapter, embed, compare embeddings, read /v1/state, wait."""

from __future__ import annotations

import time
import uuid

from http_testkit import BERT_TARGETS, make_adapter, peft_files

__all__ = ["TEXTS", "new_name", "upload", "embed", "close", "state", "wait"]

TEXTS = ["hello world", "the quick brown fox"]


def new_name() -> str:
    return f"c-{uuid.uuid4().hex[:8]}"


def upload(client, name: str, seed: int, overwrite: bool = False) -> dict:
    r = client.put(f"/v1/adapters/{name}", params={"overwrite": overwrite},
                   files=peft_files(make_adapter(BERT_TARGETS, seed=seed)))
    assert r.status_code == 201, r.text
    return r.json()


def embed(client, model: str) -> list[list[float]]:
    r = client.post("/v1/embeddings", json={"model": model, "input": TEXTS})
    assert r.status_code == 200, r.text
    return [d["embedding"] for d in r.json()["data"]]


def close(a: list[list[float]], b: list[list[float]], tol: float = 1e-5) -> bool:
    return all(abs(x - y) <= tol for va, vb in zip(a, b, strict=True) for x, y in zip(va, vb, strict=True))


def state(client) -> dict:
    r = client.get("/v1/state")
    assert r.status_code == 200, r.text
    return r.json()


def wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
