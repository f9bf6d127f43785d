"""service/base_identity.py: a store belongs to one base model. A server on another base refuses to start on
it (naming both), nothing stored changes either way, and the default store directory is one per base."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from http_testkit import ADMIN_KEY, BERT_TARGETS, bearer, make_adapter, make_settings, peft_files

from service.app import create_app
from service.base_identity import IDENTITY_KEY, BaseIdentity, base_identity, default_store_dir
from service.base_model import load_base_model
from service.storage import ForeignStoreError, canonicalize, local_store

pytestmark = pytest.mark.local_store  # inspects the embedded store's files


def _identity(path: Path, dtype: str = "float32") -> BaseIdentity:
    base = load_base_model(str(path), "cpu", dtype)
    return base_identity(base.model, base.model_id)


def test_identity_is_the_weights_not_the_path_nor_the_dtype(model_dirs, tmp_path: Path):
    bert = _identity(model_dirs["bert"])
    assert bert.architecture == "BertModel" and len(bert.digest) == 64
    copy = shutil.copytree(model_dirs["bert"], tmp_path / "elsewhere")
    assert _identity(copy).digest == bert.digest  # the same checkpoint, moved
    assert _identity(model_dirs["bert"], "bfloat16").digest == bert.digest  # --dtype does not make another base
    assert _identity(model_dirs["gpt2"]).digest != bert.digest
    base = load_base_model(str(model_dirs["bert"]), "cpu", "float32")
    with torch.no_grad():
        base.model.encoder.layer[0].attention.self.query.weight[0, 0] += 0.5  # a fine-tune of the same shapes
    assert base_identity(base.model, base.model_id).digest != bert.digest


def test_default_store_dir_is_one_per_base():
    identity = BaseIdentity("Llama 3.1/8B instruct", "LlamaForCausalLM", "0123456789abcdef" * 4)
    assert default_store_dir(identity) == Path("store") / "Llama-3.1-8B-instruct-0123456789ab"


def test_a_store_refuses_another_base_and_keeps_everything(model_dirs, tmp_path: Path):
    store_dir = tmp_path / "store"
    with TestClient(create_app(make_settings(model_dirs["bert"], store_dir)), headers=bearer(ADMIN_KEY)) as client:
        assert client.put("/v1/adapters/a", files=peft_files(make_adapter(BERT_TARGETS))).status_code == 201
    before = sorted(p.relative_to(store_dir) for p in store_dir.rglob("*") if "index.sqlite3" not in p.name)
    app = create_app(make_settings(model_dirs["gpt2"], store_dir))
    with pytest.raises(ForeignStoreError) as refused, TestClient(app):
        pass
    message = str(refused.value)
    bert, gpt2 = _identity(model_dirs["bert"]), _identity(model_dirs["gpt2"])
    assert f"'{bert.model_id}'" in message and bert.short in message  # the owner...
    assert f"'{gpt2.model_id}'" in message and gpt2.short in message  # ...and the refused base
    assert "--store" in message and app.state.store is None
    assert sorted(p.relative_to(store_dir) for p in store_dir.rglob("*") if "index.sqlite3" not in p.name) == before
    store = local_store(store_dir)
    try:
        assert [r.name for r in store.list()[0]] == ["a"]
        assert BaseIdentity.from_json(store.index.get_meta(IDENTITY_KEY)).digest == bert.digest
    finally:
        store.close()
    with TestClient(create_app(make_settings(model_dirs["bert"], store_dir)), headers=bearer(ADMIN_KEY)) as client:
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["base", "a"]  # its own base still works


def test_a_legacy_store_is_claimed_by_the_first_base(model_dirs, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    store = local_store(tmp_path / "store")
    record = store.put("old", canonicalize(make_adapter(BERT_TARGETS)))
    store.close()  # a store written before identities: rows, no identity
    with caplog.at_level(logging.WARNING, logger="service.base_identity"), \
            TestClient(create_app(make_settings(model_dirs["bert"], tmp_path / "store")),
                       headers=bearer(ADMIN_KEY)) as client:
        assert client.get("/v1/adapters/old").json()["sha256"] == record.sha256
    assert "had no base identity" in caplog.text
    store = local_store(tmp_path / "store")
    try:
        claimed = json.loads(store.index.get_meta(IDENTITY_KEY))
        assert claimed["architecture"] == "BertModel" and claimed["digest"] == _identity(model_dirs["bert"]).digest
    finally:
        store.close()


def test_without_store_each_base_gets_its_own_directory(model_dirs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    dirs = []
    for model in ("bert", "gpt2"):
        app = create_app(make_settings(model_dirs[model], None))
        with TestClient(app):
            dirs.append(app.state.settings.store)
        assert dirs[-1] == default_store_dir(_identity(model_dirs[model]))
        assert (tmp_path / dirs[-1] / "index.sqlite3").is_file()
    assert dirs[0] != dirs[1]
