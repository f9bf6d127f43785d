"""service/storage/store.py over the embedded backends (SqliteIndex, LocalBlobStore): durable, content-addressed,
indexed; consistent after a crash at any point; nothing deleted until an explicit collection. The tests that
do not look at files also run on a shared store opened as the service opens it (`any_store`: open_store with
--index-url and --blob-url, PostgreSQL behind the name cache, and S3)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
import torch
from http_testkit import BERT_TARGETS, make_adapter

from adapters import UnknownAdapterError, to_peft_bytes
from service.storage import (
    AdapterExistsError,
    AdapterStore,
    InvalidAdapterNameError,
    adapter_digest,
    canonicalize,
    local_store,
)

REPO = Path(__file__).resolve().parents[3]
TESTKIT = Path(__file__).resolve().parents[1]  # tests/service, where http_testkit lives


@pytest.fixture
def store(tmp_path: Path):
    s = local_store(tmp_path / "store")
    yield s
    s.close()


@pytest.fixture(params=["local", "shared"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "local":
        s = local_store(tmp_path / "store")
    else:
        from infra import create_database

        from service.settings import Settings
        from service.storage import open_store

        postgres_url, s3 = request.getfixturevalue("postgres_url"), request.getfixturevalue("s3_env")
        s = open_store(Settings(store=None, index_url=create_database(postgres_url),
                                blob_url=f"s3://{s3['bucket']}/store-{uuid.uuid4().hex[:12]}"))
    yield s
    s.close()


def _blobs(root: Path) -> list[Path]:
    return sorted(p for p in (root / "blobs").glob("*/*") if p.is_dir())


def _put(store: AdapterStore, name: str, weights, **kwargs):
    return store.put(name, canonicalize(weights), **kwargs)


def test_put_get_roundtrip(any_store: AdapterStore):
    store = any_store
    weights = make_adapter(BERT_TARGETS, rank=4, seed=1)
    record = _put(store, "a", weights)
    assert (record.name, record.version, record.rank) == ("a", 1, 4)
    assert record.targets == sorted(BERT_TARGETS)
    assert record.num_parameters == weights.num_parameters()
    assert record.sha256 == adapter_digest(*to_peft_bytes(weights))
    assert record.bytes == sum(len(b) for b in to_peft_bytes(weights))
    assert store.get("a") == record
    loaded = store.load_weights("a")
    for path, (a, b) in weights.lora.items():
        assert torch.equal(loaded.lora[path][0], a) and torch.equal(loaded.lora[path][1], b)
    config_bytes, model_bytes = to_peft_bytes(weights)
    assert store.read_file("a", "adapter_config.json") == config_bytes
    assert store.read_file("a", "adapter_model.safetensors") == model_bytes


def test_unknown_names_and_files(any_store: AdapterStore):
    store = any_store
    with pytest.raises(UnknownAdapterError):
        store.get("nope")
    with pytest.raises(UnknownAdapterError):
        store.load_weights("nope")
    with pytest.raises(LookupError):  # what the engine catches
        store.get("nope")
    _put(store, "a", make_adapter(BERT_TARGETS))
    with pytest.raises(UnknownAdapterError):
        store.read_file("a", "adapter_model.bin")


@pytest.mark.parametrize("name", ["", "-a", ".hidden", "a/b", "a b", "x" * 129, "ümlaut", "base", "..", "a\n"])
def test_invalid_names(store: AdapterStore, name: str):
    with pytest.raises(InvalidAdapterNameError):
        _put(store, name, make_adapter(BERT_TARGETS))
    assert store.count() == 0


@pytest.mark.parametrize("name", ["a", "A.b-c_d", "9" * 128, "v1.2"])
def test_valid_names(store: AdapterStore, name: str):
    assert _put(store, name, make_adapter(BERT_TARGETS)).name == name


def test_existing_name_conflicts_unless_overwrite(store: AdapterStore):
    first = _put(store, "a", make_adapter(BERT_TARGETS, seed=1))
    with pytest.raises(AdapterExistsError):
        _put(store, "a", make_adapter(BERT_TARGETS, seed=2))
    assert store.get("a") == first
    second = _put(store, "a", make_adapter(BERT_TARGETS, seed=2), overwrite=True)
    assert second.version == 2 and second.sha256 != first.sha256
    store.collect_garbage(grace_s=0)  # an overwrite leaves the old blob as an orphan, until a collection
    assert _blobs(store.blobs.root) == [store.blobs.root / "blobs" / second.sha256[:2] / second.sha256]
    assert _put(store, "b", make_adapter(BERT_TARGETS), overwrite=True).version == 1  # overwrite of nothing: create


def test_versions_never_repeat(any_store: AdapterStore):
    store = any_store
    _put(store, "a", make_adapter(BERT_TARGETS, seed=1))
    store.delete("a")
    assert _put(store, "a", make_adapter(BERT_TARGETS, seed=1)).version == 2


def test_identical_content_is_stored_once(store: AdapterStore):
    weights = make_adapter(BERT_TARGETS, seed=3)
    a, b = _put(store, "a", weights), _put(store, "b", weights)
    assert a.sha256 == b.sha256 and len(_blobs(store.blobs.root)) == 1
    store.delete("a")
    store.collect_garbage(grace_s=0)
    assert len(_blobs(store.blobs.root)) == 1 and store.load_weights("b")  # still referenced by b
    store.delete("b")
    assert len(_blobs(store.blobs.root)) == 1  # a delete leaves the blob until a collection
    store.collect_garbage(grace_s=0)
    assert _blobs(store.blobs.root) == [] and list(store.blobs.blobs.iterdir()) == []  # empty shards go too


def test_list_pages_by_name(any_store: AdapterStore):
    store = any_store
    weights = make_adapter(BERT_TARGETS)
    for i in range(7):
        _put(store, f"n{i}", weights)
    page, more = store.list(limit=3)
    assert [r.name for r in page] == ["n0", "n1", "n2"] and more
    page, more = store.list(limit=3, after="n2")
    assert [r.name for r in page] == ["n3", "n4", "n5"] and more
    page, more = store.list(limit=3, after="n5")
    assert [r.name for r in page] == ["n6"] and not more
    assert store.count() == 7


def test_list_and_lookup_use_the_index_with_10000_adapters(store: AdapterStore):
    """Paging and lookups seek the primary-key index instead of scanning (the timings are in benchmarks/)."""
    record = _put(store, "seed", make_adapter(BERT_TARGETS))
    # Rows sharing one blob, inserted directly: this checks the index, not 10,000 fsyncs.
    rows = [(f"a{i:05d}", 1, record.sha256, record.bytes, 4, "[]", 10, None, record.created_at, "{}")
            for i in range(10_000)]
    index = store.index
    with index._transaction():
        index._db.executemany("INSERT INTO adapters VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    page, more = store.list(limit=100, after="a05000")
    assert [r.name for r in page] == [f"a{i:05d}" for i in range(5001, 5101)] and more
    assert store.get("a09999").name == "a09999" and store.count() == 10_001
    statements = []
    index._db.set_trace_callback(statements.append)
    store.list(limit=100, after="a05000")
    store.get("a09999")
    index._db.set_trace_callback(None)
    selects = [sql for sql in statements if sql.lstrip().upper().startswith("SELECT")]
    assert len(selects) == 2
    for sql in selects:
        plan = " ".join(str(r[-1]) for r in index._db.execute(f"EXPLAIN QUERY PLAN {sql}"))
        assert plan.startswith("SEARCH adapters USING INDEX") and "SCAN" not in plan, (sql, plan)


def test_reopen_sees_everything(tmp_path: Path):
    store = local_store(tmp_path)
    record = _put(store, "a", make_adapter(BERT_TARGETS))
    store.close()
    again = local_store(tmp_path)
    assert again.get("a") == record and again.load_weights("a").targets() == sorted(BERT_TARGETS)
    again.close()


def test_failed_put_leaves_nothing(store: AdapterStore, monkeypatch: pytest.MonkeyPatch):
    import service.storage.local_blobs as module

    def boom(*_):
        raise OSError("disk full")

    monkeypatch.setattr(module.os, "rename", boom)
    with pytest.raises(OSError):
        _put(store, "a", make_adapter(BERT_TARGETS))
    root = store.blobs.root
    assert store.count() == 0 and _blobs(root) == [] and list((root / "tmp").iterdir()) == []


_CRASH = """
import os, signal, sys
sys.path[:0] = [{repo!r}, {testkit!r}]
from http_testkit import BERT_TARGETS, make_adapter
import service.storage.local_blobs as blobs_module
from service.storage import canonicalize, local_store
store = local_store({root!r})
store.put("kept", canonicalize(make_adapter(BERT_TARGETS, seed=1)))
def crash(*args):  # the temp files are written and fsync'd; die before the rename, like kill -9
    os.kill(os.getpid(), signal.SIGKILL)
blobs_module.os.rename = crash
store.put("{name}", canonicalize(make_adapter(BERT_TARGETS, seed=2)){extra})
"""


@pytest.mark.parametrize("stage", ["new", "overwrite"])
def test_crash_before_rename_leaves_no_partial_adapter(tmp_path: Path, stage: str):
    root = tmp_path / "store"
    name, extra = ("crashed", "") if stage == "new" else ("kept", ", overwrite=True")
    script = _CRASH.format(repo=str(REPO), testkit=str(TESTKIT), root=str(root), name=name, extra=extra)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert any((root / "tmp").iterdir())  # the crash really left a temp upload behind
    store = local_store(root)
    try:
        assert [r.name for r in store.list()[0]] == ["kept"]
        assert store.get("kept").version == 1  # the overwrite never happened
        assert any((root / "tmp").iterdir())  # opening deletes nothing (it may be another process's upload)...
        store.collect_garbage(grace_s=0)
        assert list((root / "tmp").iterdir()) == []  # ...a collection does
        assert _blobs(root) == [root / "blobs" / store.get("kept").sha256[:2] / store.get("kept").sha256]
        assert store.load_weights("kept").targets() == sorted(BERT_TARGETS)
    finally:
        store.close()


def test_crash_after_rename_before_index_is_collected(tmp_path: Path):
    store = local_store(tmp_path)
    weights = make_adapter(BERT_TARGETS)
    staged = store.blobs._stage(canonicalize(weights).files())  # as if the process died after the rename
    orphan = store.blobs.blobs / "ab" / ("ab" + "0" * 62)
    orphan.parent.mkdir()
    staged.rename(orphan)
    store.close()
    store = local_store(tmp_path)
    assert orphan.exists()  # opening deletes nothing
    assert store.collect_garbage(grace_s=3600).leftovers == []  # younger than the grace: perhaps an upload
    store.collect_garbage(grace_s=0)
    assert not orphan.exists() and store.count() == 0
    store.close()


def test_a_put_whose_index_insert_fails_leaves_no_blob(store: AdapterStore, monkeypatch: pytest.MonkeyPatch):
    keep = _put(store, "keep", make_adapter(BERT_TARGETS, seed=1))

    def boom(*_a, **_k):
        raise RuntimeError("index write failed")

    monkeypatch.setattr(store.index, "put", boom)
    with pytest.raises(RuntimeError):
        _put(store, "a", make_adapter(BERT_TARGETS, seed=2))
    with pytest.raises(RuntimeError):  # same content as an existing adapter: its blob must survive
        _put(store, "b", make_adapter(BERT_TARGETS, seed=1))
    store.collect_garbage(grace_s=0)  # the blob of the failed put is an unreferenced leftover
    assert store.count() == 1 and [p.name for p in _blobs(store.blobs.root)] == [keep.sha256]
    assert store.load_weights("keep").targets() == sorted(BERT_TARGETS)
