"""open_backends: settings to (index, blobs); the shared ones on real servers, None for the local defaults."""

from __future__ import annotations

import importlib.util

import pytest
from infra import create_database

from service.settings import Settings
from service.storage.backends import open_backends
from service.storage.name_cache import CachedIndex
from service.storage.postgres_index import PostgresIndex
from service.storage.s3_blobs import S3BlobStore


def test_no_urls_means_the_local_defaults(tmp_path):
    assert open_backends(Settings(store=tmp_path)) == (None, None)


@pytest.fixture
def aws_env(s3_settings, monkeypatch):
    """The standard AWS variables, as a deployment would set them (boto3 reads them itself)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_settings["endpoint_url"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_settings["access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_settings["secret_access_key"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", s3_settings["region"])
    return s3_settings["endpoint_url"]


def test_postgres_and_s3_urls(postgres_url, aws_env, tmp_path):
    settings = Settings(store=tmp_path, index_url=create_database(postgres_url), blob_url="s3://lora-backends/x")
    index, blobs = open_backends(settings)
    try:
        assert isinstance(index, CachedIndex) and isinstance(blobs, S3BlobStore)
        assert (blobs.bucket, blobs.prefix) == ("lora-backends", "x")
        assert blobs.put("ab" * 32, {"adapter_config.json": b"{}"}) and blobs.exists("ab" * 32)
        assert index.count() == 0 and index.set_meta_if_absent("k", "v") == "v"
    finally:
        index.close()
        blobs.close()


def test_no_name_cache_when_its_ttl_is_zero(postgres_url, tmp_path):
    index, blobs = open_backends(Settings(store=tmp_path, index_url=create_database(postgres_url),
                                          name_cache_ttl_s=0))
    assert isinstance(index, PostgresIndex) and blobs is None
    index.close()


@pytest.mark.skipif(importlib.util.find_spec("service.storage.local_blobs") is None,
                    reason="LocalBlobStore comes with the storage seam")
def test_a_file_url_is_local_blobs_on_a_shared_volume(tmp_path):
    index, blobs = open_backends(Settings(store=tmp_path / "s", blob_url=f"file://{tmp_path / 'shared'}"))
    assert index is None and type(blobs).__name__ == "LocalBlobStore"
    blobs.close()


def test_settings_refuse_other_urls_and_hide_the_password(tmp_path):
    with pytest.raises(ValueError, match="PostgreSQL URL"):
        Settings(store=tmp_path, index_url="mysql://db/x")
    with pytest.raises(ValueError, match="s3://bucket"):
        Settings(store=tmp_path, blob_url="https://bucket.example/x")
    settings = Settings(store=tmp_path, index_url="postgresql://lora:s3cret@db:5432/lora", blob_url="/mnt/shared")
    assert settings.public_dict()["index_url"] == "postgresql://lora:***@db:5432/lora"
    assert "s3cret" not in repr(settings) and "s3cret" not in str(settings.public_dict())
    assert Settings(store=tmp_path, index_url=" ", blob_url="").index_url is None  # LORA_INDEX_URL= (empty)


# ---------------------------------------------------------------------------------------------- open_store
def _roundtrip(store) -> None:
    from http_testkit import BERT_TARGETS, make_adapter

    from service.storage import canonicalize

    record = store.put("a", canonicalize(make_adapter(BERT_TARGETS, seed=1)))
    assert store.get("a") == record and store.load_weights(record).targets() == sorted(BERT_TARGETS)


def test_open_store_mixes_shared_and_local_backends(postgres_url, aws_env, tmp_path):
    from service.storage import LocalBlobStore, SqliteIndex, open_store

    db = create_database(postgres_url)
    pg_local = open_store(Settings(store=tmp_path / "a", index_url=db, blob_url=f"file://{tmp_path / 'volume'}"))
    try:  # PostgreSQL names, files on a shared volume: nothing under --store
        assert isinstance(pg_local.index, CachedIndex) and isinstance(pg_local.blobs, LocalBlobStore)
        assert pg_local.blobs.root == tmp_path / "volume" and not (tmp_path / "a").exists()
        assert pg_local.location == f"index {db}, blobs file://{tmp_path / 'volume'}"
        _roundtrip(pg_local)
    finally:
        pg_local.close()
    local_s3 = open_store(Settings(store=tmp_path / "b", blob_url="s3://lora-backends/mix"))
    try:  # SQLite under --store, files in S3
        assert isinstance(local_s3.index, SqliteIndex) and isinstance(local_s3.blobs, S3BlobStore)
        assert (tmp_path / "b" / "index.sqlite3").is_file() and not (tmp_path / "b" / "blobs").exists()
        assert local_s3.location.endswith("blobs s3://lora-backends/mix (endpoint " + aws_env + ")")
        _roundtrip(local_s3)
    finally:
        local_s3.close()
    with pytest.raises(ValueError, match="no store directory"):  # something is local, and there is no directory
        open_store(Settings(index_url=db))


def test_lora_store_gc_on_a_shared_store(postgres_url, aws_env, tmp_path, capsys):
    import json

    from http_testkit import BERT_TARGETS, make_adapter

    from service.storage import canonicalize, open_store
    from service.storage.cli import main

    urls = ["--index-url", create_database(postgres_url), "--blob-url", "s3://lora-backends/gc"]
    store = open_store(Settings(index_url=urls[1], blob_url=urls[3], name_cache_ttl_s=0))
    gone = store.put("gone", canonicalize(make_adapter(BERT_TARGETS, seed=1)))
    kept = store.put("kept", canonicalize(make_adapter(BERT_TARGETS, seed=2)))
    store.delete("gone")
    assert main(["gc", *urls, "--grace-seconds", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["orphans"] == [gone.sha256]
    assert [s for s, _ in store.blobs.list()] == [kept.sha256]
    store.close()
    assert main(["gc", "--index-url", "postgresql://x@127.0.0.1:1/x", "--blob-url", "s3://lora-backends/gc"]) == 1
    assert "the adapter index (index) at postgresql://x@127.0.0.1:1/x is unreachable" in capsys.readouterr().err


def test_a_shared_store_belongs_to_one_base(postgres_url, tmp_path):
    """claim_store on PostgreSQL (set_meta_if_absent): the first base claims it, the same base on another server
    is welcome, another base is refused, as on the embedded store."""
    from service.base_identity import BaseIdentity, claim_store
    from service.storage import ForeignStoreError, open_store

    db = create_database(postgres_url)
    mine, other = BaseIdentity("bert", "BertModel", "a" * 64), BaseIdentity("gpt2", "GPT2Model", "b" * 64)
    stores = [open_store(Settings(store=tmp_path / str(i), index_url=db)) for i in range(2)]  # two servers
    try:
        claim_store(stores[0].index, mine, stores[0].location)
        claim_store(stores[1].index, mine, stores[1].location)
        with pytest.raises(ForeignStoreError, match="belongs to base model 'bert'"):
            claim_store(stores[1].index, other, stores[1].location)
        assert BaseIdentity.from_json(stores[1].index.get_meta("base_identity")) == mine
    finally:
        for store in stores:
            store.close()
