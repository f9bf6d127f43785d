"""What only the embedded backends do: SqliteIndex migrates an index written by earlier versions in place;
LocalBlobStore keeps names out of paths and leaves young temporary files alone."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from pathlib import Path

import pytest

from service.storage import LocalBlobStore, NewAdapter, SqliteIndex, local_store

# The schema and one row exactly as the store before the storage seam wrote them.
_OLD_SCHEMA = """
CREATE TABLE adapters (name TEXT PRIMARY KEY, version INTEGER NOT NULL, sha256 TEXT NOT NULL, bytes INTEGER NOT NULL,
    rank INTEGER NOT NULL, targets TEXT NOT NULL, num_parameters INTEGER NOT NULL, task_type TEXT,
    created_at TEXT NOT NULL, meta TEXT NOT NULL DEFAULT '{}');
CREATE INDEX adapters_by_sha256 ON adapters(sha256);
CREATE TABLE versions (name TEXT PRIMARY KEY, last INTEGER NOT NULL);
"""
_SHA = hashlib.sha256(b"old").hexdigest()


def test_an_index_from_before_the_seam_is_migrated_in_place(tmp_path: Path):
    path = tmp_path / "index.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(_OLD_SCHEMA)
    db.execute("INSERT INTO adapters VALUES ('old', 3, ?, 10, 4, '[\"q\"]', 64, NULL, '2025-01-01T00:00:00.000+00:00',"
               " '{}')", (_SHA,))
    db.execute("INSERT INTO versions VALUES ('old', 3)")
    db.commit()
    db.close()
    index = SqliteIndex(path)
    try:
        record = index.get("old")
        assert (record.version, record.sha256, record.targets) == (3, _SHA, ["q"])
        assert index.sequence() == 0 and index.get_meta("base_identity") is None and index.orphans(0) == []
        new = NewAdapter(name="old", sha256=_SHA, bytes=10, rank=4, targets=["q"], num_parameters=64, task_type=None)
        assert index.put(new, overwrite=True)[0].version == 4  # the version history carries on
        assert index.changes_since(0) == [(1, "old")]
    finally:
        index.close()
    tables = {r[0] for r in sqlite3.connect(path).execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"adapters", "versions", "changes", "orphans", "meta"} <= tables


def test_blob_paths_come_from_digests_only(tmp_path: Path):
    blobs = LocalBlobStore(tmp_path)
    for bad in ("../../etc", "ab", _SHA.upper(), _SHA + "0"):
        with pytest.raises(ValueError):
            blobs.put(bad, {"adapter_config.json": b"{}"})
    with pytest.raises(ValueError):
        blobs.put(_SHA, {"../escape": b"x"})
    assert not blobs.exists(_SHA) and list(blobs.tmp.iterdir()) == []


def test_only_old_temporary_files_are_collected(tmp_path: Path):
    blobs = LocalBlobStore(tmp_path)
    young, old = blobs.tmp / "young", blobs.tmp / "old"
    young.mkdir()
    old.mkdir()
    (old / "adapter_model.safetensors").write_bytes(b"partial")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert blobs.collect_temporary(3600) == 1
    assert [p.name for p in blobs.tmp.iterdir()] == ["young"]


def test_opening_a_store_deletes_nothing(tmp_path: Path):
    store = local_store(tmp_path)
    store.close()
    leftover = tmp_path / "tmp" / "upload-in-progress"
    leftover.mkdir()
    stray = tmp_path / "blobs" / _SHA[:2] / _SHA
    stray.mkdir(parents=True)
    (stray / "adapter_config.json").write_bytes(b"{}")
    local_store(tmp_path).close()
    assert leftover.exists() and stray.exists()


def test_a_put_survives_a_delete_removing_its_shard_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import service.storage.local_blobs as module

    blobs, real_rename, calls = LocalBlobStore(tmp_path), os.rename, []

    def racing_rename(src, dst):
        calls.append(dst)
        if len(calls) == 1:
            Path(dst).parent.rmdir()  # a delete of the shard's last other blob, just between mkdir and rename
        return real_rename(src, dst)

    monkeypatch.setattr(module.os, "rename", racing_rename)
    assert blobs.put(_SHA, {"adapter_config.json": b"{}"}) is True
    assert len(calls) == 2 and blobs.get(_SHA, "adapter_config.json") == b"{}"
