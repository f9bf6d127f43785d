"""service/limits.py: JSON bodies are capped before they are parsed; the engine tokenizes off its loop thread."""

from __future__ import annotations

import contextlib
import json
import threading

from fastapi.testclient import TestClient

LIMIT = 4 * 1024 * 1024  # the default max_request_bytes


def test_a_json_body_over_the_cap_is_413_before_it_is_parsed(bert_client: TestClient):
    body = json.dumps({"model": "base", "input": "word " * (LIMIT // 5 + 10)})
    r = bert_client.post("/v1/embeddings", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["type"] == "payload_too_large"
    assert "max_request_bytes" in r.json()["error"]["message"]


def test_a_chunked_body_is_cut_off_once_it_passes_the_cap(bert_client: TestClient):
    sent = []

    def chunks():  # no Content-Length: the cap must hold on the running total
        for _ in range(64):
            sent.append(1)
            yield b" " * (128 * 1024)

    r = bert_client.post("/v1/embeddings", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["type"] == "payload_too_large"


def test_bodies_under_the_cap_and_uploads_pass(bert_client: TestClient):
    r = bert_client.post("/v1/embeddings", json={"model": "base", "input": ["a text"] * 100})
    assert r.status_code == 200 and len(r.json()["data"]) == 100
    bad = bert_client.post("/v1/embeddings", content=b"{", headers={"Content-Type": "application/json",
                                                                    "Content-Length": "nonsense"})
    assert bad.status_code == 400


class _Watching:
    """A tokenizer that records which thread calls it."""

    def __init__(self, real) -> None:
        self.real, self.threads = real, []

    def __call__(self, *args, **kwargs):
        self.threads.append(threading.current_thread().name)
        return self.real(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_the_loop_thread_never_tokenizes(bert_client: TestClient, gpt2_client: TestClient):
    """Tokenizing happens in the handlers' worker threads, on tokenizers borrowed from the engine's pool: a
    long text never stalls other requests' batches."""
    for client, request in ((bert_client, ("/v1/embeddings", {"model": "base", "input": ["one", "two"]})),
                            (gpt2_client, ("/v1/completions", {"model": "base", "prompt": "hi", "max_tokens": 3}))):
        pool = client.app.state.engine.tokenizers
        real_borrow, watched = pool.borrow, []

        @contextlib.contextmanager
        def borrow_watched(real_borrow=real_borrow, watched=watched):
            with real_borrow() as tokenizer:
                watched.append(_Watching(tokenizer))
                yield watched[-1]

        pool.borrow = borrow_watched
        try:
            assert client.post(request[0], json=request[1]).status_code == 200
        finally:
            del pool.borrow  # back to the class's method
        threads = [name for w in watched for name in w.threads]
        assert threads and "lora-engine" not in threads


def test_a_body_that_is_not_utf8_or_nests_too_deep_is_the_same_422_as_any_non_json(bert_client: TestClient):
    for body in (b'{"model": "base", "input": "\xe9"}', b"[" * 100_000 + b"]" * 100_000, b"{"):
        r = bert_client.post("/v1/embeddings", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 422 and r.json()["error"]["type"] == "validation_error", r.text
        assert "not valid JSON" in r.json()["error"]["message"]


def test_claiming_to_be_an_upload_does_not_lift_the_cap(bert_client: TestClient):
    body = b"x" * (LIMIT + 1)
    r = bert_client.post("/v1/embeddings", content=body, headers={"Content-Type": "multipart/form-data; boundary=x"})
    assert r.status_code == 413 and r.json()["error"]["type"] == "payload_too_large"
