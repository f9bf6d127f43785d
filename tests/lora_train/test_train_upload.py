"""--upload: the request's shape (against a local stub), its errors, and end to end into the real
service started as a subprocess (train -> upload -> GET metadata -> classify with the adapter)."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import torch
from infra import free_port, wait_http_ready

from adapters import LoraConfig, LoraWeights, save_peft_dir
from lora_train.cli import main
from lora_train.upload import UploadError, upload_adapter

PYTHON = sys.executable
KEY = "train-test-admin-key-0123456789"


class _Stub(BaseHTTPRequestHandler):
    """Records each request; answers with the class's (status, body)."""

    answer: tuple[int, dict] = (201, {"name": "x"})
    STATE = (200, {})  # GET /v1/state: the admin-only read the check before training makes
    EXISTING = (404, {"error": {"message": "not found", "type": "unknown_adapter_error"}})  # the name is free
    state, existing = STATE, EXISTING
    seen: list[dict] = []

    def do_PUT(self):  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.seen.append({"path": self.path, "auth": self.headers.get("Authorization"),
                          "ctype": self.headers.get("Content-Type"), "body": body})
        self._send(*self.answer)

    def do_GET(self):  # noqa: N802
        self.seen.append({"path": self.path, "auth": self.headers.get("Authorization"), "method": "GET"})
        self._send(*(self.state if self.path == "/v1/state" else self.existing))

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):  # keep pytest's output clean
        pass


@pytest.fixture
def stub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    _Stub.seen = []
    _Stub.state, _Stub.existing = _Stub.STATE, _Stub.EXISTING
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def adapter_dir(tmp_path) -> Path:
    pair = (torch.ones(2, 4), torch.zeros(4, 2))  # A (r, in), B (out, r)
    weights = LoraWeights(LoraConfig(r=2, target_modules=["query"]), {"enc.query": pair})
    return save_peft_dir(weights, tmp_path / "adapter")


def test_upload_sends_both_peft_files_and_the_bearer_key(stub, adapter_dir):
    server, url = stub
    _Stub.answer = (201, {"name": "my-adapter", "version": 1})
    answer = upload_adapter(url + "/", "my-adapter", adapter_dir, api_key="k1", overwrite=True)
    assert answer == {"name": "my-adapter", "version": 1}
    (req,) = _Stub.seen
    assert req["path"] == "/v1/adapters/my-adapter?overwrite=true" and req["auth"] == "Bearer k1"
    assert req["ctype"].startswith("multipart/form-data")
    for field in ("adapter_config.json", "adapter_model.safetensors"):
        assert f'name="{field}"; filename="{field}"'.encode() in req["body"]
    assert (adapter_dir / "adapter_model.safetensors").read_bytes() in req["body"]


def test_cli_key_comes_from_the_flag_else_from_lora_api_key(stub, adapter_dir, monkeypatch, capsys):
    import argparse

    from lora_train.cli import _upload

    server, url = stub
    _Stub.answer = (201, {"name": "n1", "version": 1})
    monkeypatch.setenv("LORA_API_KEY", "from-env")
    for flag, expected in ((None, "Bearer from-env"), ("from-flag", "Bearer from-flag")):
        _upload(argparse.Namespace(upload=url, name="n1", api_key=flag, overwrite=False), str(adapter_dir))
        assert _Stub.seen[-1]["auth"] == expected
    monkeypatch.delenv("LORA_API_KEY")
    _upload(argparse.Namespace(upload=url, name="n1", api_key=None, overwrite=False), str(adapter_dir))
    assert _Stub.seen[-1]["auth"] is None
    assert "from-env" not in capsys.readouterr().out


def test_upload_errors_carry_the_service_message(stub, adapter_dir, tmp_path):
    server, url = stub
    _Stub.answer = (409, {"error": {"message": "adapter 'x' exists", "type": "conflict_error", "key": None}})
    with pytest.raises(UploadError) as info:
        upload_adapter(url, "x", adapter_dir)
    assert info.value.status == 409 and "HTTP 409" in str(info.value) and "adapter 'x' exists" in str(info.value)
    assert "--overwrite" in str(info.value)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(UploadError, match="cannot reach the service"):
        upload_adapter(dead, "x", adapter_dir)
    with pytest.raises(UploadError, match="missing"):
        upload_adapter(url, "x", tmp_path)  # not an adapter directory


def test_cli_upload_failure_exits_3(stub, tiny_bert_dir, classify_files, tmp_path, capsys):
    server, url = stub
    _Stub.answer = (422, {"error": {"message": "rank 8 exceeds the maximum 4", "type": "adapter_too_large_error",
                                    "key": "base_model.model.x.lora_A.weight"}})
    train_file, _ = classify_files
    code = main(["--base-model", str(tiny_bert_dir), "--data", str(train_file), "--out", str(tmp_path / "o"),
                 "--epochs", "1", "--no-progress", "--upload", url, "--name", "n1"])
    err = capsys.readouterr().err
    assert code == 3
    assert "HTTP 422" in err and "rank 8 exceeds the maximum 4" in err
    assert (tmp_path / "o" / "adapter_model.safetensors").is_file()  # the adapter is kept for a retry


@pytest.mark.parametrize(("state", "existing", "flags", "message"), [
    ((401, {"error": {"message": "missing key"}}), None, [], "HTTP 401 (missing or wrong --api-key)"),
    ((403, {"error": {"message": "admin only"}}), None, [], "use an admin key"),
    (None, (200, {"name": "n1", "version": 1}), [], "already exists"),
    (None, None, ["--upload", "UNREACHABLE"], "cannot reach the service"),
])
def test_upload_problems_are_found_before_training(stub, tiny_bert_dir, classify_files, tmp_path, capsys,
                                                   state, existing, flags, message):
    server, url = stub
    if state:
        _Stub.state = state
    if existing:
        _Stub.existing = existing
    if flags:
        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            flags = ["--upload", f"http://127.0.0.1:{s.getsockname()[1]}"]
    train_file, _ = classify_files
    code = main(["--base-model", str(tiny_bert_dir), "--data", str(train_file), "--out", str(tmp_path / "o"),
                 "--epochs", "1", "--no-progress", "--upload", url, "--name", "n1", *flags])
    assert code == 3 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing was trained
    assert not any(r.get("method") != "GET" for r in _Stub.seen)  # and nothing was uploaded


def test_overwrite_lets_an_existing_name_through_the_check(stub, adapter_dir):
    from lora_train.upload import check_upload_target

    server, url = stub
    _Stub.existing = (200, {"name": "n1", "version": 1})
    check_upload_target(url, "n1", api_key="k", overwrite=True)
    assert [r["auth"] for r in _Stub.seen] == ["Bearer k", "Bearer k"]


@pytest.mark.e2e
def test_train_upload_and_classify_in_a_running_service(tiny_bert_dir, classify_files, tmp_path, capsys):
    if importlib.util.find_spec("service.__main__") is None:
        pytest.skip("the service package (python -m service) is not available")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "service.log").open("w")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([PYTHON, "-m", "service", "--host", "127.0.0.1", "--port", str(port),
                             "--store", str(tmp_path / "store"), "--base-model", str(tiny_bert_dir),
                             "--admin-keys", KEY], stdout=log, stderr=subprocess.STDOUT, env=env,
                            cwd=Path(__file__).resolve().parents[2])
    headers = {"Authorization": f"Bearer {KEY}"}
    try:
        train_file, eval_file = classify_files
        wait_http_ready(url, proc, 120)
        code = main(["--base-model", str(tiny_bert_dir), "--data", str(train_file), "--eval", str(eval_file),
                     "--out", str(tmp_path / "adapter"), "--epochs", "5", "--lr", "3e-2", "--no-progress",
                     "--upload", url, "--name", "fruit-vs-vehicles", "--api-key", KEY])
        out = capsys.readouterr().out
        assert code == 0, (out, (tmp_path / "service.log").read_text()[-3000:])
        assert "uploaded 'fruit-vs-vehicles'" in out and '"version": 1' in out
        meta = httpx.get(f"{url}/v1/adapters/fruit-vs-vehicles", headers=headers, timeout=30)
        assert meta.status_code == 200, meta.text
        assert meta.json()["rank"] == 8 and meta.json()["task_type"] == "SEQ_CLS"
        texts = ["the apple is red", "a big truck near my boat"]
        answer = httpx.post(f"{url}/v1/classify", headers=headers, timeout=60,
                            json={"model": "fruit-vs-vehicles", "input": texts})
        assert answer.status_code == 200, answer.text
        labels = [row["label"] for row in answer.json()["data"]]
        assert labels == ["pos", "neg"]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


