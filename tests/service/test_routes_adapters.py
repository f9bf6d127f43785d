"""service/routes/adapters.py: upload, list, describe, download, delete, merge; every error status.

After every refused upload or merge the store and the base fingerprint are checked unchanged.
"""

from __future__ import annotations

import json

import pytest
import torch
from fastapi.testclient import TestClient
from http_testkit import BERT_TARGETS, make_adapter, peft_files, single_file
from safetensors.torch import save

from adapters import to_peft_bytes, to_single_file_bytes


def _snapshot(client: TestClient) -> tuple[int, str, list[str]]:
    state = client.get("/v1/state", params={"fingerprints": "true"}).json()
    store = client.app.state.store
    return store.count(), state["fingerprint"], sorted(sha for sha, _ in store.blobs.list())


@pytest.fixture
def unchanged(bert_client: TestClient):
    """Asserts that the test leaves the store and the base weights exactly as it found them."""
    before = _snapshot(bert_client)
    yield
    after = _snapshot(bert_client)
    assert after == before
    assert bert_client.get("/readyz").status_code == 200  # and the server keeps serving


def test_upload_peft_files(bert_client: TestClient, unique: str):
    weights = make_adapter(BERT_TARGETS, rank=4)
    r = bert_client.put(f"/v1/adapters/{unique}", files=peft_files(weights))
    assert r.status_code == 201, r.text
    info = r.json()
    assert info["name"] == unique and info["version"] == 1 and info["rank"] == 4
    assert info["targets"] == sorted(BERT_TARGETS)
    assert info["num_parameters"] == weights.num_parameters()
    fp = info["footprint"]
    base = bert_client.app.state.base
    assert fp["base_parameters"] == base.num_parameters and fp["adapter_bytes"] == info["bytes"]
    assert fp["bytes_ratio"] == pytest.approx(info["bytes"] / base.nbytes)
    assert bert_client.get(f"/v1/adapters/{unique}").json() == info


def test_upload_single_file(bert_client: TestClient, unique: str):
    r = bert_client.put(f"/v1/adapters/{unique}", files=single_file(make_adapter(BERT_TARGETS, seed=5)))
    assert r.status_code == 201, r.text
    assert bert_client.post("/v1/embeddings", json={"model": unique, "input": "hi"}).status_code == 200


def test_upload_files_written_by_peft(bert_client: TestClient, model_dirs, tmp_path, unique: str):
    peft = pytest.importorskip("peft")
    from transformers import BertModel

    model = peft.get_peft_model(BertModel.from_pretrained(model_dirs["bert"]),
                                peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    model.save_pretrained(tmp_path)
    files = {f: (f, (tmp_path / f).read_bytes()) for f in ("adapter_config.json", "adapter_model.safetensors")}
    r = bert_client.put(f"/v1/adapters/{unique}", files=files)
    assert r.status_code == 201, r.text
    assert r.json()["rank"] == 4
    # Every file of the directory, as `curl -F file=@dir/<each>` sends it: README.md is there and ignored,
    # the two files are found by their filenames; the same adapter, so the same stored bytes.
    assert (tmp_path / "README.md").is_file()
    every = [("file", (p.name, p.read_bytes())) for p in sorted(tmp_path.iterdir())]
    again = bert_client.put(f"/v1/adapters/{unique}-all", files=every)
    assert again.status_code == 201, again.text
    assert again.json()["sha256"] == r.json()["sha256"]
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04K\x01.")  # a pickle beside them is still refused
    every = [("file", (p.name, p.read_bytes())) for p in sorted(tmp_path.iterdir())]
    refused = bert_client.put(f"/v1/adapters/{unique}-bin", files=every)
    assert refused.status_code == 415 and refused.json()["error"]["code"] == "unsupported_media_type"


def test_download_returns_the_stored_peft_files(bert_client: TestClient, unique: str):
    weights = make_adapter(BERT_TARGETS, seed=7)
    bert_client.put(f"/v1/adapters/{unique}", files=single_file(weights))  # stored as the two PEFT files
    config_bytes, model_bytes = to_peft_bytes(weights)
    r = bert_client.get(f"/v1/adapters/{unique}/files/adapter_config.json")
    assert r.status_code == 200 and r.content == config_bytes and r.headers["content-type"] == "application/json"
    r = bert_client.get(f"/v1/adapters/{unique}/files/adapter_model.safetensors")
    assert r.status_code == 200 and r.content == model_bytes
    assert bert_client.get(f"/v1/adapters/{unique}/files/adapter_model.bin").status_code == 404
    assert bert_client.get(f"/v1/adapters/{unique}/files/..%2Findex.sqlite3").status_code == 404
    assert bert_client.get("/v1/adapters/missing/files/adapter_config.json").status_code == 404


def test_conflict_and_overwrite(bert_client: TestClient, unique: str):
    first = bert_client.put(f"/v1/adapters/{unique}", files=peft_files(make_adapter(BERT_TARGETS, seed=1))).json()
    r = bert_client.put(f"/v1/adapters/{unique}", files=peft_files(make_adapter(BERT_TARGETS, seed=2)))
    assert r.status_code == 409 and r.json()["error"]["type"] == "adapter_exists_error"
    assert bert_client.get(f"/v1/adapters/{unique}").json()["sha256"] == first["sha256"]
    r = bert_client.put(f"/v1/adapters/{unique}?overwrite=true", files=peft_files(make_adapter(BERT_TARGETS, seed=2)))
    assert r.status_code == 201 and r.json()["version"] == 2 and r.json()["sha256"] != first["sha256"]


def test_overwrite_serves_the_new_version(bert_client: TestClient, unique: str):
    bert_client.put(f"/v1/adapters/{unique}", files=peft_files(make_adapter(BERT_TARGETS, seed=1)))
    old = bert_client.post("/v1/embeddings", json={"model": unique, "input": "hello"}).json()["data"][0]["embedding"]
    bert_client.put(f"/v1/adapters/{unique}?overwrite=true", files=peft_files(make_adapter(BERT_TARGETS, seed=9)))
    new = bert_client.post("/v1/embeddings", json={"model": unique, "input": "hello"}).json()["data"][0]["embedding"]
    assert old != new


def test_list_is_paginated(bert_client: TestClient, unique: str):
    for i in range(3):
        r = bert_client.put(f"/v1/adapters/{unique}-{i}", files=single_file(make_adapter(BERT_TARGETS)))
        assert r.status_code == 201
    page = bert_client.get("/v1/adapters", params={"limit": 2, "after": unique}).json()
    assert [a["name"] for a in page["data"]] == [f"{unique}-0", f"{unique}-1"]
    assert page["has_more"] and page["next"] == f"{unique}-1" and page["total"] >= 3
    page = bert_client.get("/v1/adapters", params={"limit": 2, "after": page["next"]}).json()
    assert page["data"][0]["name"] == f"{unique}-2"
    assert bert_client.get("/v1/adapters", params={"limit": 0}).status_code == 422


def test_delete(bert_client: TestClient, unique: str):
    bert_client.put(f"/v1/adapters/{unique}", files=single_file(make_adapter(BERT_TARGETS)))
    bert_client.post("/v1/embeddings", json={"model": unique, "input": "x"})  # make it resident
    r = bert_client.delete(f"/v1/adapters/{unique}")
    assert r.status_code == 200 and r.json() == {"object": "adapter.deleted", "name": unique, "version": 1,
                                                 "deleted": True}
    assert bert_client.get(f"/v1/adapters/{unique}").status_code == 404
    assert bert_client.delete(f"/v1/adapters/{unique}").status_code == 404
    assert bert_client.post("/v1/embeddings", json={"model": unique, "input": "x"}).status_code == 404
    assert unique not in bert_client.get("/v1/state").json()["resident_adapters"]


def test_unknown_adapter_is_404(bert_client: TestClient):
    r = bert_client.get("/v1/adapters/never-uploaded")
    assert r.status_code == 404
    assert r.json()["error"] == {"message": "adapter 'never-uploaded' not found", "type": "unknown_adapter_error",
                                 "param": "name", "code": "adapter_not_found", "key": "never-uploaded"}


@pytest.mark.parametrize("name", ["-bad", ".x", "a" * 129, "sp ace", "base"])
def test_invalid_name_is_422(bert_client: TestClient, name: str, unchanged):
    r = bert_client.put(f"/v1/adapters/{name}", files=single_file(make_adapter(BERT_TARGETS)))
    assert r.status_code == 422 and "invalid adapter name" in r.json()["error"]["message"]


# ---------------------------------------------------------------------------------------------- bad uploads
def _corrupt(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _bad_uploads() -> dict[str, tuple[dict, int, str | None]]:
    good = make_adapter(BERT_TARGETS)
    config, model = to_peft_bytes(good)
    wrong_shape = make_adapter({**BERT_TARGETS, "encoder.layer.0.attention.self.query": (16, 32)})
    unknown_module = make_adapter({"encoder.layer.7.attention.self.query": (32, 32)})
    nan = make_adapter(BERT_TARGETS)
    nan.lora["encoder.layer.1.attention.self.value"][1][0, 0] = float("nan")
    dora = json.dumps({**json.loads(config), "use_dora": True}).encode()

    def files(c: bytes, m: bytes) -> dict:
        return {"adapter_config.json": ("adapter_config.json", c), "adapter_model.safetensors": ("m", m)}

    return {
        "truncated safetensors": (files(config, _corrupt(model)), 422, None),
        "config not json": (files(b"{not json", model), 422, None),
        "dora": (files(dora, model), 422, "use_dora"),
        "wrong shape": (peft_files(wrong_shape), 422, "base_model.model.encoder.layer.0.attention.self.query"
                        ".lora_A.weight"),
        "unknown module": (peft_files(unknown_module), 422, "base_model.model.encoder.layer.7.attention.self.query"
                           ".lora_A.weight"),
        "nan": (peft_files(nan), 422, "base_model.model.encoder.layer.1.attention.self.value.lora_B.weight"),
        "rank above max_rank": (peft_files(make_adapter(BERT_TARGETS, rank=32)), 422, None),
        "single file without config": ({"adapter": ("a", save(good.to_state_dict()))}, 422, None),
        "missing weights field": ({"adapter_config.json": ("c", config)}, 400, None),
        "unknown field": ({"weights": ("w", model)}, 400, None),
        "both forms": ({**files(config, model), "adapter": ("a", to_single_file_bytes(good))}, 400, None),
        "pickle by name": ({"adapter_config.json": ("c", config), "adapter_model.bin": ("b", b"\x80\x04junk")}, 415,
                           None),
        "pickle content": (files(config, b"PK\x03\x04zipped torch.save"), 415, None),
        "empty weights": (files(config, b""), 422, None),
    }


@pytest.mark.parametrize("case", list(_bad_uploads()))
def test_bad_upload_changes_nothing(bert_client: TestClient, unique: str, case: str, unchanged):
    files, status, key = _bad_uploads()[case]
    r = bert_client.put(f"/v1/adapters/{unique}", files=files)
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert body["message"] and body["type"]
    if key is not None:
        assert body["key"] == key
    assert bert_client.get(f"/v1/adapters/{unique}").status_code == 404


def test_not_multipart_is_415(bert_client: TestClient, unique: str, unchanged):
    r = bert_client.put(f"/v1/adapters/{unique}", content=b"{}", headers={"Content-Type": "application/json"})
    assert r.status_code == 415 and r.json()["error"]["type"] == "unsupported_media_type"
    r = bert_client.put(f"/v1/adapters/{unique}", content=to_single_file_bytes(make_adapter(BERT_TARGETS)))
    assert r.status_code == 415


def test_malformed_multipart_is_400(bert_client: TestClient, unique: str, unchanged):
    headers = {"Content-Type": "multipart/form-data; boundary=xyz"}
    r = bert_client.put(f"/v1/adapters/{unique}", content=b"--xyz\r\nContent-Disposition: form-data; name=\"adapter\""
                        b"\r\n\r\npartial", headers=headers)
    assert r.status_code == 400
    r = bert_client.put(f"/v1/adapters/{unique}", content=b"", headers={"Content-Type": "multipart/form-data"})
    assert r.status_code == 400


def test_a_compressed_upload_is_415_not_stored_as_is(bert_client: TestClient, unique: str, unchanged):
    import gzip

    files = peft_files(make_adapter(BERT_TARGETS, seed=4))
    plain = bert_client.build_request("PUT", f"/v1/adapters/{unique}", files=files)
    for encoding, content in (("gzip", gzip.compress(plain.read())), ("gzip", plain.read()), ("br", plain.read())):
        r = bert_client.put(f"/v1/adapters/{unique}", content=content,
                            headers={"Content-Type": plain.headers["Content-Type"], "Content-Encoding": encoding})
        assert r.status_code == 415 and "Content-Encoding" in r.json()["error"]["message"]


def test_too_large_is_413_by_content_length(bert_client: TestClient, unique: str, unchanged):
    limit = int(bert_client.app.state.settings.max_upload_bytes)
    big = {"adapter": ("a", b"\0" * (limit + 1))}
    r = bert_client.put(f"/v1/adapters/{unique}", files=big)
    assert r.status_code == 413 and r.json()["error"]["type"] == "payload_too_large"


def test_too_large_is_413_while_streaming(bert_client: TestClient, unique: str, unchanged):
    """A chunked body with no Content-Length: cut off once the running total passes the limit."""
    limit = int(bert_client.app.state.settings.max_upload_bytes)
    sent = 0

    def body():
        nonlocal sent
        yield b"--b\r\nContent-Disposition: form-data; name=\"adapter\"\r\n\r\n"
        for _ in range(limit // 65536 + 50):
            sent += 65536
            yield b"\0" * 65536

    r = bert_client.put(f"/v1/adapters/{unique}", content=body(),
                        headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413


def test_merge_unknown_is_404_and_bad_name_422(bert_client: TestClient, unchanged):
    assert bert_client.post("/v1/adapters/never-uploaded/merge").status_code == 404
    assert bert_client.post("/v1/adapters/-x/merge").status_code == 422
