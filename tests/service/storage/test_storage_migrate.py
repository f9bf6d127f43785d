"""copy_store and its CLI between two shared stores (PostgreSQL + S3 on real servers), both ways."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from infra import create_database, make_postgres_index, make_s3_blobs

from service.storage.interfaces import NewAdapter
from service.storage.migrate import FILENAMES, copy_store, main
from service.storage.postgres_index import PostgresIndex

REPO = Path(__file__).resolve().parents[3]


def blob(i: int) -> tuple[str, dict[str, bytes]]:
    return f"{i:02x}" * 32, {FILENAMES[0]: b'{"r": %d}' % i, FILENAMES[1]: bytes([i]) * (100 + i)}


def fill(index, blobs) -> None:
    """Three names with a history: versions 1, 2 (overwritten) and 2 (after a delete), one blob shared."""
    for i in range(1, 4):
        sha, files = blob(i)
        blobs.put(sha, files)
    def new(name, i, **kw):
        return NewAdapter(name=name, sha256=blob(i)[0], bytes=10 * i, rank=i, targets=["q"], num_parameters=i,
                          task_type="SEQ_CLS" if i == 2 else None, meta={"i": i}, **kw)
    index.put(new("alpha", 1), overwrite=False)
    index.put(new("beta", 1), overwrite=False)
    index.put(new("beta", 2), overwrite=True)
    index.put(new("gamma", 3), overwrite=False)
    index.delete("gamma")
    index.put(new("gamma", 3), overwrite=False)


@pytest.fixture
def stores(postgres_url, s3_settings):
    made = [(make_postgres_index(postgres_url), make_s3_blobs(s3_settings)) for _ in range(3)]
    yield made
    for index, blobs in made:
        index.close()
        blobs.close()


def snapshot(index) -> list:
    return [r.as_dict() for r in index.list(limit=100)[0]]


def test_copy_there_and_back_keeps_names_versions_dates_and_bytes(stores):
    (a_index, a_blobs), (b_index, b_blobs), (c_index, c_blobs) = stores
    fill(a_index, a_blobs)
    report = copy_store(a_index, a_blobs, b_index, b_blobs)
    assert sorted(report.copied) == ["alpha", "beta", "gamma"] and not report.skipped and not report.conflicts
    assert snapshot(b_index) == snapshot(a_index)
    assert [(r.name, r.version) for r in b_index.list()[0]] == [("alpha", 1), ("beta", 2), ("gamma", 2)]
    for r in b_index.list()[0]:
        assert {f: b_blobs.get(r.sha256, f) for f in FILENAMES} == blob(int(r.sha256[:2], 16))[1]
    assert sorted(s for s, _ in b_blobs.list()) == sorted({r.sha256 for r in a_index.list()[0]})  # only live blobs
    back = copy_store(b_index, b_blobs, c_index, c_blobs)
    assert len(back.copied) == 3 and snapshot(c_index) == snapshot(a_index)


def test_copy_is_idempotent_and_reports_conflicts(stores):
    (a_index, a_blobs), (b_index, b_blobs), _ = stores
    fill(a_index, a_blobs)
    copy_store(a_index, a_blobs, b_index, b_blobs)
    again = copy_store(a_index, a_blobs, b_index, b_blobs)
    assert again.copied == [] and sorted(again.skipped) == ["alpha", "beta", "gamma"]
    b_index.put(NewAdapter(name="alpha", sha256=blob(3)[0], bytes=1, rank=1, targets=["q"], num_parameters=1,
                           task_type=None), overwrite=True)
    a_index.put(NewAdapter(name="delta", sha256=blob(1)[0], bytes=1, rank=1, targets=["q"], num_parameters=1,
                           task_type=None), overwrite=False)
    third = copy_store(a_index, a_blobs, b_index, b_blobs)
    assert third.copied == ["delta"] and third.conflicts == ["alpha"]
    assert b_index.get("alpha").version == 2  # the conflicting name is left as it was


def test_store_wide_facts_are_carried_and_a_different_one_refuses(stores):
    (a_index, a_blobs), (b_index, b_blobs), (c_index, c_blobs) = stores
    a_index.set_meta_if_absent("base_model", "minilm:abc")
    copy_store(a_index, a_blobs, b_index, b_blobs, meta_keys=["base_model"])
    assert b_index.get_meta("base_model") == "minilm:abc"
    c_index.set_meta_if_absent("base_model", "gpt2:def")
    with pytest.raises(ValueError, match="base_model"):
        copy_store(a_index, a_blobs, c_index, c_blobs, meta_keys=["base_model"])


def test_cli_between_urls(postgres_url, s3_settings, monkeypatch, capsys):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_settings["endpoint_url"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_settings["access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_settings["secret_access_key"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", s3_settings["region"])
    src, dst = make_postgres_index(postgres_url), create_database(postgres_url)
    src_blobs = make_s3_blobs(s3_settings)
    fill(src, src_blobs)
    argv = ["--from-index-url", src.url, "--from-blob-url", src_blobs.url, "--to-index-url", dst,
            "--to-blob-url", f"s3://{s3_settings['bucket']}/cli-copy-{dst.rsplit('/', 1)[1]}"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out) == {"copied": 3, "skipped": 0, "conflicts": []}
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out) == {"copied": 0, "skipped": 3, "conflicts": []}
    src.close()
    src_blobs.close()


def test_python_m_migrate_from_a_local_store_and_back(tmp_path, postgres_url, s3_settings):
    """The command as documented, in a fresh interpreter: a store the service wrote (real adapters, a base identity,
    an overwrite and a delete in its history) to PostgreSQL + S3 and back to a directory, unchanged."""
    from http_testkit import BERT_TARGETS, make_adapter

    from service.storage import canonicalize, local_store

    src = local_store(tmp_path / "src")
    src.index.set_meta_if_absent("base_identity", '{"digest": "abc"}')
    src.put("alpha", canonicalize(make_adapter(BERT_TARGETS, seed=1)))
    src.put("alpha", canonicalize(make_adapter(BERT_TARGETS, seed=2)), overwrite=True)
    src.put("beta", canonicalize(make_adapter(BERT_TARGETS, seed=3)), meta={"composed_from": ["alpha"]})
    src.put("gamma", canonicalize(make_adapter(BERT_TARGETS, seed=4)))
    src.delete("gamma")
    src.put("gamma", canonicalize(make_adapter(BERT_TARGETS, seed=4)))
    before = snapshot(src.index)
    src.close()
    assert [(r["name"], r["version"]) for r in before] == [("alpha", 2), ("beta", 1), ("gamma", 2)]
    db = create_database(postgres_url)
    blob_url = f"s3://{s3_settings['bucket']}/local-{db.rsplit('/', 1)[1]}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "AWS_ENDPOINT_URL": s3_settings["endpoint_url"],
           "AWS_ACCESS_KEY_ID": s3_settings["access_key_id"], "AWS_SECRET_ACCESS_KEY": s3_settings["secret_access_key"],
           "AWS_DEFAULT_REGION": s3_settings["region"]}

    def migrate(*args: str) -> dict:
        done = subprocess.run([sys.executable, "-m", "service.storage.migrate", *args, "--meta-key", "base_identity"],
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout)

    there = ["--to-index-url", db, "--to-blob-url", blob_url]
    assert migrate("--from-store", str(tmp_path / "src"), *there) == {"copied": 3, "skipped": 0, "conflicts": []}
    assert migrate("--from-store", str(tmp_path / "src"), *there)["skipped"] == 3  # idempotent
    shared = PostgresIndex(db)
    assert snapshot(shared) == before and shared.get_meta("base_identity") == '{"digest": "abc"}'
    shared.close()
    back = migrate("--from-index-url", db, "--from-blob-url", blob_url, "--to-store", str(tmp_path / "back"))
    assert back["copied"] == 3
    copy = local_store(tmp_path / "back")
    try:
        assert snapshot(copy.index) == before and copy.index.get_meta("base_identity") == '{"digest": "abc"}'
        for name, seed in (("alpha", 2), ("beta", 3), ("gamma", 4)):  # the bytes, by the record's sha256
            assert copy.read_file(name, FILENAMES[1]) == canonicalize(make_adapter(BERT_TARGETS, seed=seed)).files()[
                FILENAMES[1]]
        assert copy.put("alpha", canonicalize(make_adapter(BERT_TARGETS, seed=5)), overwrite=True).version == 3
    finally:
        copy.close()
