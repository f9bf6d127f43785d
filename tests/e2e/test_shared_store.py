"""Two real servers (`python -m service`) on one shared store: the session's PostgreSQL 15 index and SeaweedFS
S3 blobs (tests/infra.py), both servers on the same tiny BERT base, nothing stored locally.

What one server writes, the other answers from its very next request (upload, overwrite, delete); a server
killed with SIGKILL in the middle of an upload leaves nothing for the other to see; a backend that cannot be
reached at start-up stops the server with the reason, and one that goes away while serving answers 503 for
writes while cached adapters keep serving, until it is back (no restart).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from infra import create_database, free_port, wait_http_ready

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))
from http_testkit import BERT_TARGETS, build_bert, make_adapter, peft_files  # noqa: E402

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
ADMIN = "e2e-shared-admin-key-0123456789"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
READY_TIMEOUT_S = 120


class Server:
    def __init__(self, root: Path, name: str, base: Path, args: list[str], env: dict[str, str]) -> None:
        self.port, self.log_path = free_port(), root / f"{name}.log"
        self.url = f"http://127.0.0.1:{self.port}"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(self.port), "--base-model",
                 str(base), "--device", "cpu", "--max-wait-ms", "1", *args],
                cwd=root, env={**os.environ, "PYTHONPATH": str(REPO), "LORA_ADMIN_KEYS": ADMIN, **env},
                stdout=log, stderr=subprocess.STDOUT)

    def log(self, tail: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:]

    def wait_ready(self) -> None:
        wait_http_ready(self.url, self.proc, READY_TIMEOUT_S, self.log)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


def _aws_env(s3: dict) -> dict[str, str]:
    return {"AWS_ENDPOINT_URL": s3["endpoint_url"], "AWS_ACCESS_KEY_ID": s3["access_key_id"],
            "AWS_SECRET_ACCESS_KEY": s3["secret_access_key"], "AWS_DEFAULT_REGION": s3["region"]}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_bert(tmp_path_factory.mktemp("shared-base") / "bert")


@pytest.fixture(scope="module")
def servers(tmp_path_factory, base: Path, postgres_url: str, s3_settings: dict) -> Iterator[dict[str, Server]]:
    root = tmp_path_factory.mktemp("shared-e2e")
    args = ["--index-url", create_database(postgres_url), "--blob-url",
            f"s3://{s3_settings['bucket']}/e2e-{uuid.uuid4().hex[:8]}"]
    started = {name: Server(root, name, base, args, _aws_env(s3_settings)) for name in ("a", "b")}
    try:
        for server in started.values():
            server.wait_ready()
        yield started
    finally:
        for server in started.values():
            server.stop()
    assert not (root / "store").exists()  # both backends shared: nothing local, not even the default directory


def _embed(server: Server, model: str) -> np.ndarray:
    r = httpx.post(f"{server.url}/v1/embeddings", json={"model": model, "input": ["the quick brown fox"]},
                   headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    return np.array(r.json()["data"][0]["embedding"])


def _put(server: Server, name: str, seed: int, overwrite: bool = False) -> httpx.Response:
    return httpx.put(f"{server.url}/v1/adapters/{name}", params={"overwrite": str(overwrite).lower()},
                     files=peft_files(make_adapter(BERT_TARGETS, seed=seed)), headers=AUTH, timeout=60)


def test_an_unreachable_backend_at_start_is_named_and_exits_non_zero(tmp_path: Path, base: Path):
    closed = free_port()
    index = Server(tmp_path, "index", base, ["--index-url", f"postgresql://lora:s3cret@127.0.0.1:{closed}/x"], {})
    blobs = Server(tmp_path, "blobs", base, ["--store", str(tmp_path / "store"), "--blob-url", "s3://b/p"],
                   {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{closed}", "AWS_ACCESS_KEY_ID": "k",
                    "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1"})
    for server in (index, blobs):
        assert server.proc.wait(90) != 0, server.log()
    index_log, blobs_log = index.log(tail=10**6), blobs.log(tail=10**6)
    assert (f"refusing to start: the adapter index (index) at postgresql://lora:***@127.0.0.1:{closed}/x is "
            "unreachable" in index_log and "s3cret" not in index_log), index_log
    assert (f"refusing to start: the adapter blob store (blobs) at s3://b/p (endpoint http://127.0.0.1:{closed}) is "
            "unreachable" in blobs_log), blobs_log


def test_an_upload_on_one_server_is_served_by_the_other(servers):
    a, b = servers["a"], servers["b"]
    assert _put(a, "shared", seed=1).status_code == 201
    from_a, from_b = _embed(a, "shared"), _embed(b, "shared")
    np.testing.assert_array_equal(from_a, from_b)
    assert not np.allclose(from_b, _embed(b, "base"), atol=1e-4)
    store = httpx.get(f"{a.url}/v1/state", headers=AUTH).json()["store"]
    assert store["location"].startswith("index postgresql://postgres@127.0.0.1:") and "blobs s3://" in store["location"]
    assert store["name_cache"]["trusted"] and store["name_cache"]["stale_served"] == 0


def test_an_overwrite_on_one_server_is_served_by_the_other_at_once(servers):
    a, b = servers["a"], servers["b"]
    assert _put(a, "hot", seed=1).status_code == 201
    before = _embed(a, "hot")  # resident on A from here on
    for seed in (2, 3, 4):
        r = _put(b, "hot", seed=seed, overwrite=True)
        assert r.status_code == 201 and r.json()["version"] == seed
        now = _embed(a, "hot")  # the very next request on A
        np.testing.assert_array_equal(now, _embed(b, "hot"))
        assert not np.allclose(now, before, atol=1e-4)
        before = now


def test_a_delete_on_one_server_is_a_404_on_the_other(servers):
    a, b = servers["a"], servers["b"]
    assert _put(b, "gone", seed=5).status_code == 201
    _embed(b, "gone")  # resident on B
    assert httpx.delete(f"{a.url}/v1/adapters/gone", headers=AUTH).status_code == 200
    r = httpx.post(f"{b.url}/v1/embeddings", json={"model": "gone", "input": ["x"]}, headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert httpx.get(f"{b.url}/v1/adapters/gone", headers=AUTH).status_code == 404


def _wait_for(check, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "no recovery"
        time.sleep(0.2)


def test_a_backend_down_while_serving(servers, postgres_server, s3_server):
    a, b = servers["a"], servers["b"]
    assert _put(a, "held", seed=6).status_code == 201 and _put(b, "cold", seed=7).status_code == 201
    held = _embed(a, "held")  # resident on A; "cold" never loaded there
    compose = {"name": "mix", "adapters": [{"name": "held", "weight": 1.0}]}

    postgres_server.stop()
    try:
        np.testing.assert_array_equal(_embed(a, "held"), held)  # served from the copy A holds
        for r in (_put(a, "new", seed=8), _put(a, "held", seed=8, overwrite=True),
                  httpx.delete(f"{a.url}/v1/adapters/held", headers=AUTH),
                  httpx.post(f"{a.url}/v1/compose", json=compose, headers=AUTH, timeout=60),
                  httpx.post(f"{a.url}/v1/embeddings", json={"model": "cold", "input": ["x"]}, headers=AUTH)):
            assert r.status_code == 503 and "PostgreSQL unreachable" in r.json()["error"]["message"], r.text
    finally:
        postgres_server.start()
    _wait_for(lambda: _put(a, "new", seed=8).status_code == 201)  # the same processes recover by themselves
    listed = httpx.get(f"{b.url}/v1/adapters", headers=AUTH).json()["data"]
    assert {r["name"]: r["version"] for r in listed if r["name"] in ("held", "cold", "mix")} == {"held": 1, "cold": 1}

    s3_server.stop()
    try:
        np.testing.assert_array_equal(_embed(a, "held"), held)  # resolved in the index, weights in A's memory
        r = httpx.post(f"{a.url}/v1/embeddings", json={"model": "cold", "input": ["x"]}, headers=AUTH)
        assert r.status_code == 503 and r.json()["error"]["type"] == "storage_unavailable_error", r.text
        assert _put(a, "blobless", seed=9).status_code == 503
    finally:
        s3_server.start()
    _wait_for(lambda: httpx.post(f"{a.url}/v1/embeddings", json={"model": "cold", "input": ["x"]},
                                 headers=AUTH).status_code == 200)
    np.testing.assert_array_equal(_embed(a, "cold"), _embed(b, "cold"))
    assert httpx.get(f"{b.url}/v1/adapters/blobless", headers=AUTH).status_code == 404


def test_a_server_killed_mid_upload_leaves_nothing_for_the_other(servers):
    a, b = servers["a"], servers["b"]
    names = lambda: sorted(r["name"] for r in httpx.get(f"{b.url}/v1/adapters", headers=AUTH).json()["data"])  # noqa: E731
    before = names()
    boundary = "lora-e2e-boundary"
    body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
                    f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n"
                    for field, (filename, data) in peft_files(make_adapter(BERT_TARGETS, seed=10)).items())
    body += f"--{boundary}--\r\n".encode()
    head = (f"PUT /v1/adapters/crashed HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {ADMIN}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n")
    with socket.create_connection(("127.0.0.1", a.port), timeout=10) as sock:
        sock.sendall(head.encode() + body[: len(body) // 2])  # the upload is under way on A
        time.sleep(0.3)
        os.kill(a.proc.pid, signal.SIGKILL)
        a.proc.wait(10)
        sent = threading.Thread(target=lambda: _send_rest(sock, body[len(body) // 2:]))
        sent.start()
        sent.join(10)
    assert names() == before and httpx.get(f"{b.url}/v1/adapters/crashed", headers=AUTH).status_code == 404
    r = _put(b, "crashed", seed=10)
    assert r.status_code == 201 and r.json()["version"] == 1  # no version was spent by the dead upload
    _embed(b, "crashed")


def _send_rest(sock: socket.socket, rest: bytes) -> None:
    try:
        sock.sendall(rest)
    except OSError:
        pass  # the server is gone: that is the point
