"""service/store.py: durable, content-addressed, indexed; consistent after a crash at any point."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from http_testkit import BERT_TARGETS, make_adapter

from adapters import UnknownAdapterError, to_peft_bytes
from service.store import AdapterExistsError, AdapterStore, InvalidAdapterNameError, adapter_digest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def store(tmp_path: Path):
    s = AdapterStore(tmp_path / "store")
    yield s
    s.close()


def _blobs(root: Path) -> list[Path]:
    return sorted(p for p in (root / "blobs").glob("*/*") if p.is_dir())


def test_put_get_roundtrip(store: AdapterStore):
    weights = make_adapter(BERT_TARGETS, rank=4, seed=1)
    record = store.put("a", weights)
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


def test_unknown_names_and_files(store: AdapterStore):
    with pytest.raises(UnknownAdapterError):
        store.get("nope")
    with pytest.raises(UnknownAdapterError):
        store.load_weights("nope")
    with pytest.raises(LookupError):  # what the engine catches
        store.get("nope")
    store.put("a", make_adapter(BERT_TARGETS))
    with pytest.raises(UnknownAdapterError):
        store.read_file("a", "adapter_model.bin")


@pytest.mark.parametrize("name", ["", "-a", ".hidden", "a/b", "a b", "x" * 129, "ümlaut", "base", "..", "a\n"])
def test_invalid_names(store: AdapterStore, name: str):
    with pytest.raises(InvalidAdapterNameError):
        store.put(name, make_adapter(BERT_TARGETS))
    assert store.count() == 0


@pytest.mark.parametrize("name", ["a", "A.b-c_d", "9" * 128, "v1.2"])
def test_valid_names(store: AdapterStore, name: str):
    assert store.put(name, make_adapter(BERT_TARGETS)).name == name


def test_existing_name_conflicts_unless_overwrite(store: AdapterStore):
    first = store.put("a", make_adapter(BERT_TARGETS, seed=1))
    with pytest.raises(AdapterExistsError):
        store.put("a", make_adapter(BERT_TARGETS, seed=2))
    assert store.get("a") == first
    second = store.put("a", make_adapter(BERT_TARGETS, seed=2), overwrite=True)
    assert second.version == 2 and second.sha256 != first.sha256
    assert _blobs(store.root) == [store.root / "blobs" / second.sha256[:2] / second.sha256]  # old blob collected
    assert store.put("b", make_adapter(BERT_TARGETS), overwrite=True).version == 1  # overwrite of nothing: create


def test_versions_never_repeat(store: AdapterStore):
    store.put("a", make_adapter(BERT_TARGETS, seed=1))
    store.delete("a")
    assert store.put("a", make_adapter(BERT_TARGETS, seed=1)).version == 2


def test_identical_content_is_stored_once(store: AdapterStore):
    weights = make_adapter(BERT_TARGETS, seed=3)
    a, b = store.put("a", weights), store.put("b", weights)
    assert a.sha256 == b.sha256 and len(_blobs(store.root)) == 1
    store.delete("a")
    assert len(_blobs(store.root)) == 1 and store.load_weights("b")  # still referenced by b
    store.delete("b")
    assert _blobs(store.root) == [] and list(store.blobs.iterdir()) == []  # empty shard directories go too


def test_list_pages_by_name(store: AdapterStore):
    weights = make_adapter(BERT_TARGETS)
    for i in range(7):
        store.put(f"n{i}", weights)
    page, more = store.list(limit=3)
    assert [r.name for r in page] == ["n0", "n1", "n2"] and more
    page, more = store.list(limit=3, after="n2")
    assert [r.name for r in page] == ["n3", "n4", "n5"] and more
    page, more = store.list(limit=3, after="n5")
    assert [r.name for r in page] == ["n6"] and not more
    assert store.count() == 7


def test_list_and_lookup_use_the_index_with_10000_adapters(store: AdapterStore):
    """Paging and lookups seek the primary-key index instead of scanning (the timings are in benchmarks/)."""
    record = store.put("seed", make_adapter(BERT_TARGETS))
    # Rows sharing one blob, inserted directly: this checks the index, not 10,000 fsyncs.
    rows = [(f"a{i:05d}", 1, record.sha256, record.bytes, 4, "[]", 10, None, record.created_at, "{}")
            for i in range(10_000)]
    with store._transaction():
        store._db.executemany("INSERT INTO adapters VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    page, more = store.list(limit=100, after="a05000")
    assert [r.name for r in page] == [f"a{i:05d}" for i in range(5001, 5101)] and more
    assert store.get("a09999").name == "a09999" and store.count() == 10_001
    statements = []
    store._db.set_trace_callback(statements.append)
    store.list(limit=100, after="a05000")
    store.get("a09999")
    store._db.set_trace_callback(None)
    selects = [sql for sql in statements if sql.lstrip().upper().startswith("SELECT")]
    assert len(selects) == 2
    for sql in selects:
        plan = " ".join(str(r[-1]) for r in store._db.execute(f"EXPLAIN QUERY PLAN {sql}"))
        assert plan.startswith("SEARCH adapters USING INDEX") and "SCAN" not in plan, (sql, plan)


def test_reopen_sees_everything(tmp_path: Path):
    store = AdapterStore(tmp_path)
    record = store.put("a", make_adapter(BERT_TARGETS))
    store.close()
    again = AdapterStore(tmp_path)
    assert again.get("a") == record and again.load_weights("a").targets() == sorted(BERT_TARGETS)
    again.close()


def test_failed_put_leaves_nothing(store: AdapterStore, monkeypatch: pytest.MonkeyPatch):
    import service.store as module

    def boom(*_):
        raise OSError("disk full")

    monkeypatch.setattr(module.os, "replace", boom)
    with pytest.raises(OSError):
        store.put("a", make_adapter(BERT_TARGETS))
    assert store.count() == 0 and _blobs(store.root) == [] and list((store.root / "tmp").iterdir()) == []


_CRASH = """
import os, signal, sys
sys.path[:0] = [{repo!r}, {testkit!r}]
from http_testkit import BERT_TARGETS, make_adapter
import service.store as store_module
from service.store import AdapterStore
store = AdapterStore({root!r})
store.put("kept", make_adapter(BERT_TARGETS, seed=1))
def crash(*args):  # the temp files are written and fsync'd; die before the rename, like kill -9
    os.kill(os.getpid(), signal.SIGKILL)
store_module.os.replace = crash
store.put("{name}", make_adapter(BERT_TARGETS, seed=2){extra})
"""


@pytest.mark.parametrize("stage", ["new", "overwrite"])
def test_crash_before_rename_leaves_no_partial_adapter(tmp_path: Path, stage: str):
    root = tmp_path / "store"
    name, extra = ("crashed", "") if stage == "new" else ("kept", ", overwrite=True")
    script = _CRASH.format(repo=str(REPO), testkit=str(Path(__file__).parent), root=str(root), name=name, extra=extra)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert any((root / "tmp").iterdir())  # the crash really left a temp upload behind
    store = AdapterStore(root)
    try:
        assert [r.name for r in store.list()[0]] == ["kept"]
        assert store.get("kept").version == 1  # the overwrite never happened
        assert list((root / "tmp").iterdir()) == []  # cleaned on open
        assert _blobs(root) == [root / "blobs" / store.get("kept").sha256[:2] / store.get("kept").sha256]
        assert store.load_weights("kept").targets() == sorted(BERT_TARGETS)
    finally:
        store.close()


def test_crash_after_rename_before_index_is_collected(tmp_path: Path):
    store = AdapterStore(tmp_path)
    weights = make_adapter(BERT_TARGETS)
    staged = store._stage(*to_peft_bytes(weights))  # as if the process died after the rename
    orphan = store.blobs / "ab" / ("ab" + "0" * 62)
    orphan.parent.mkdir()
    staged.rename(orphan)
    store.close()
    store = AdapterStore(tmp_path)
    assert not orphan.exists() and store.count() == 0
    store.close()


def test_a_put_whose_index_insert_fails_leaves_no_blob(store: AdapterStore, monkeypatch: pytest.MonkeyPatch):
    keep = store.put("keep", make_adapter(BERT_TARGETS, seed=1))

    def boom(*_a, **_k):
        raise RuntimeError("index write failed")

    monkeypatch.setattr(store, "_insert", boom)
    with pytest.raises(RuntimeError):
        store.put("a", make_adapter(BERT_TARGETS, seed=2))
    with pytest.raises(RuntimeError):  # same content as an existing adapter: its blob must survive
        store.put("b", make_adapter(BERT_TARGETS, seed=1))
    assert store.count() == 1 and [p.name for p in _blobs(store.root)] == [keep.sha256]
    assert store.load_weights("keep").targets() == sorted(BERT_TARGETS)
