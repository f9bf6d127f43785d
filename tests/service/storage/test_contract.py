"""The storage contract: what every AdapterIndex and BlobStore does, and what the AdapterStore facade
promises over any pair of them. Each test runs once per backend in storage_backends.py."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from http_testkit import BERT_TARGETS, make_adapter
from storage_backends import open_blobs, open_index

from adapters import UnknownAdapterError
from service.storage import (
    AdapterExistsError,
    AdapterIndex,
    AdapterStore,
    BlobStore,
    ChangesPrunedError,
    MissingBlobError,
    NewAdapter,
    canonicalize,
)

HERE = Path(__file__).resolve().parent
REPO, TESTKIT = HERE.parents[2], HERE.parent


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _new(name: str, sha: str = _sha("x"), **kwargs) -> NewAdapter:
    values = dict(name=name, sha256=sha, bytes=10, rank=4, targets=["q", "v"], num_parameters=64, task_type=None)
    values.update(kwargs)
    return NewAdapter(**values)


FILES = {"adapter_config.json": b'{"r": 4}', "adapter_model.safetensors": b"\x00" * 64}


def _at_once(fn, n: int) -> None:
    """fn(0) ... fn(n - 1), each in its own thread, released together by a barrier (as n processes racing)."""
    barrier = threading.Barrier(n)

    def run(i: int) -> None:
        barrier.wait()
        fn(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)


# ---------------------------------------------------------------------------------------------- the index
def test_index_creates_a_name_once(index: AdapterIndex):
    record, replaced = index.put(_new("a", meta={"k": [1, 2]}), overwrite=False)
    assert (record.name, record.version, replaced) == ("a", 1, None)
    assert record.targets == ["q", "v"] and record.meta == {"k": [1, 2]} and record.created_at.endswith("+00:00")
    assert index.get("a") == record and index.count() == 1
    with pytest.raises(AdapterExistsError):
        index.put(_new("a", sha=_sha("y")), overwrite=False)
    assert index.get("a") == record
    with pytest.raises(UnknownAdapterError):
        index.get("b")
    with pytest.raises(LookupError):  # what the engine catches
        index.get("b")


def test_overwrite_gives_the_next_version_and_versions_are_never_reused(index: AdapterIndex):
    first, _ = index.put(_new("a"), overwrite=False)
    second, replaced = index.put(_new("a", sha=_sha("y")), overwrite=True)
    assert second.version == 2 and replaced == first and index.get("a").sha256 == _sha("y")
    assert index.delete("a") == second
    with pytest.raises(UnknownAdapterError):
        index.delete("a")
    third, replaced = index.put(_new("a"), overwrite=False)
    assert third.version == 3 and replaced is None
    assert index.put(_new("b"), overwrite=True)[0].version == 1  # an overwrite of nothing creates


def test_a_migration_keeps_version_and_creation_time(index: AdapterIndex):
    record, _ = index.put(_new("a", version=7, created_at="2020-01-02T03:04:05.006+00:00"), overwrite=False)
    assert (record.version, record.created_at) == (7, "2020-01-02T03:04:05.006+00:00")
    assert index.put(_new("a"), overwrite=True)[0].version == 8


def test_list_pages_in_name_order(index: AdapterIndex):
    for name in ["n3", "n0", "n6", "n1", "n5", "n2", "n4"]:
        index.put(_new(name), overwrite=False)
    page, more = index.list(limit=3)
    assert [r.name for r in page] == ["n0", "n1", "n2"] and more
    page, more = index.list(limit=3, after="n2")
    assert [r.name for r in page] == ["n3", "n4", "n5"] and more
    page, more = index.list(limit=3, after="n5")
    assert [r.name for r in page] == ["n6"] and not more
    assert index.list(limit=3, after="n6") == ([], False) and index.count() == 7


def test_every_change_is_sequenced(index: AdapterIndex):
    assert index.sequence() == 0 and index.changes_since(0) == []
    index.put(_new("a"), overwrite=False)
    mark = index.sequence()
    index.put(_new("b"), overwrite=False)
    index.put(_new("a", sha=_sha("y")), overwrite=True)
    index.delete("b")
    with pytest.raises(AdapterExistsError):  # a refused put changes nothing
        index.put(_new("a"), overwrite=False)
    changes = index.changes_since(mark)
    assert [name for _, name in changes] == ["b", "a", "b"]
    seqs = [seq for seq, _ in changes]
    assert seqs == sorted(seqs) and seqs[0] > mark and seqs[-1] == index.sequence()
    assert index.changes_since(index.sequence()) == []


def test_pruning_changes_keeps_the_newest_and_the_sequence(index: AdapterIndex):
    assert index.prune_changes(0) == 0  # an empty log
    index.put(_new("a"), overwrite=False)
    index.put(_new("b"), overwrite=False)
    index.delete("a")
    old = index.sequence()
    time.sleep(1.5)
    index.put(_new("c"), overwrite=False)
    index.put(_new("d"), overwrite=False)
    latest = index.sequence()
    assert index.prune_changes(3600) == 0 and len(index.changes_since(0)) == 5  # all younger than an hour
    assert index.prune_changes(1.0) == 3  # the three written before the pause
    assert index.sequence() == latest
    assert [name for _, name in index.changes_since(old)] == ["c", "d"]  # a follower at the pruned point: exact
    with pytest.raises(ChangesPrunedError) as pruned:  # a follower further behind is told, never silently short
        index.changes_since(old - 1)
    assert (pruned.value.since, pruned.value.latest) == (old - 1, latest)
    assert index.prune_changes(0) == 1 and index.prune_changes(0) == 0  # the newest always stays
    assert index.sequence() == latest and index.changes_since(latest - 1) == [(latest, "d")]
    assert index.changes_since(latest) == []
    with pytest.raises(ChangesPrunedError):
        index.changes_since(old)
    index.put(_new("e"), overwrite=False)
    assert index.sequence() > latest and index.changes_since(latest) == [(index.sequence(), "e")]


def test_orphans_are_noted_when_the_last_row_goes(index: AdapterIndex):
    x, y = _sha("x"), _sha("y")
    index.put(_new("a", sha=x), overwrite=False)
    index.put(_new("b", sha=x), overwrite=False)
    index.delete("a")
    assert index.orphans(0) == [] and index.referenced() == {x}  # b still points at x
    index.put(_new("b", sha=y), overwrite=True)
    assert index.orphans(0) == [x] and index.referenced() == {y}
    assert index.orphans(3600) == []  # orphaned just now: within any grace period
    assert index.forget_orphan(y) is False  # referenced: never an orphan
    assert index.forget_orphan(x) is True and index.orphans(0) == []
    assert index.forget_orphan(x) is False  # forgotten already: another collector got it


def test_a_put_takes_an_orphan_back(index: AdapterIndex):
    x = _sha("x")
    index.put(_new("a", sha=x), overwrite=False)
    index.delete("a")
    assert index.orphans(0) == [x]
    index.put(_new("c", sha=x), overwrite=False)  # an upload of the same bytes
    assert index.orphans(0) == [] and index.forget_orphan(x) is False


def test_meta_is_set_once(index: AdapterIndex):
    assert index.get_meta("base_identity") is None
    assert index.set_meta_if_absent("base_identity", "one") == "one"
    assert index.set_meta_if_absent("base_identity", "two") == "one"
    assert index.get_meta("base_identity") == "one"


def test_meta_compare_and_set(index: AdapterIndex):
    assert index.compare_and_set_meta("pins", "x", "a") is False  # not set: only expected=None sets it
    assert index.compare_and_set_meta("pins", None, "a") is True
    assert index.compare_and_set_meta("pins", None, "b") is False
    assert index.compare_and_set_meta("pins", "b", "c") is False
    assert index.get_meta("pins") == "a"
    assert index.compare_and_set_meta("pins", "a", "b") is True
    assert index.get_meta("pins") == "b" and index.get_meta("other") is None


def test_concurrent_compare_and_set_loses_no_update(index_spec):
    indexes = [open_index(*index_spec) for _ in range(2)]  # as two processes would

    def bump(index: AdapterIndex) -> None:
        for _ in range(15):
            while True:
                current = index.get_meta("counter")
                if index.compare_and_set_meta("counter", current, str(int(current or 0) + 1)):
                    break

    try:
        _at_once(lambda i: bump(indexes[i % 2]), 4)  # two threads on each connection
        assert indexes[0].get_meta("counter") == "60"
    finally:
        for ix in indexes:
            ix.close()


def test_two_connections_see_each_other(index: AdapterIndex, index_spec):
    other = open_index(*index_spec)
    try:
        index.put(_new("a"), overwrite=False)
        assert other.get("a") == index.get("a") and other.sequence() == index.sequence()
        with pytest.raises(AdapterExistsError):
            other.put(_new("a"), overwrite=False)
    finally:
        other.close()


def test_concurrent_puts_of_one_name_one_wins(index_spec):
    indexes = [open_index(*index_spec) for _ in range(2)]  # as two processes would
    outcomes = []

    def put(i: int) -> None:
        try:
            indexes[i].put(_new("same", sha=_sha(str(i))), overwrite=False)
            outcomes.append("won")
        except AdapterExistsError:
            outcomes.append("409")

    _at_once(put, 2)
    try:
        assert sorted(outcomes) == ["409", "won"] and indexes[0].get("same").version == 1
    finally:
        for i in indexes:
            i.close()


# ---------------------------------------------------------------------------------------------- the blobs
def test_blobs_are_put_if_absent(blobs: BlobStore):
    sha = _sha("blob")
    assert not blobs.exists(sha)
    with pytest.raises(FileNotFoundError):
        blobs.get(sha, "adapter_config.json")
    assert blobs.put(sha, FILES) is True
    assert blobs.put(sha, {"adapter_config.json": b"other", "adapter_model.safetensors": b""}) is False
    assert blobs.exists(sha)
    assert {f: blobs.get(sha, f) for f in FILES} == FILES  # the first write stays
    with pytest.raises(FileNotFoundError):
        blobs.get(sha, "adapter_model.bin")
    listed = dict(blobs.list())
    assert list(listed) == [sha] and abs(listed[sha] - time.time()) < 600
    blobs.delete(sha)
    blobs.delete(sha)  # idempotent
    assert not blobs.exists(sha) and list(blobs.list()) == []
    with pytest.raises(FileNotFoundError):
        blobs.get(sha, "adapter_config.json")


def test_collect_temporary_leaves_stored_blobs(blobs: BlobStore):
    sha = _sha("blob")
    blobs.put(sha, FILES)
    assert blobs.collect_temporary(3600) == 0
    assert blobs.collect_temporary(0) >= 0 and blobs.get(sha, "adapter_config.json") == FILES["adapter_config.json"]


def test_concurrent_puts_of_one_blob(blobs: BlobStore, blob_spec):
    stores, sha = [blobs, open_blobs(*blob_spec)], _sha("blob")
    results = []
    _at_once(lambda i: results.append(stores[i].put(sha, FILES)), 2)
    assert len(results) == 2 and True in results
    assert {f: blobs.get(sha, f) for f in FILES} == FILES and [s for s, _ in blobs.list()] == [sha]


# ---------------------------------------------------------------------------------------------- the facade
def test_concurrent_store_puts_of_one_name_one_wins(store: AdapterStore):
    adapters = [canonicalize(make_adapter(BERT_TARGETS, seed=i)) for i in range(2)]
    outcomes = []

    def put(i: int) -> None:
        try:
            outcomes.append(store.put("same", adapters[i]).sha256)
        except AdapterExistsError:
            outcomes.append("409")

    _at_once(put, 2)
    assert sorted(outcomes, key=len) == ["409", store.get("same").sha256]
    assert store.load_weights("same").targets() == sorted(BERT_TARGETS)


def test_a_deleted_or_replaced_blob_stays_until_a_collection(store: AdapterStore):
    old = store.put("a", canonicalize(make_adapter(BERT_TARGETS, seed=1)))
    new = store.put("a", canonicalize(make_adapter(BERT_TARGETS, seed=2)), overwrite=True)
    assert store.load_weights(old).lora and store.blobs.exists(old.sha256)  # a reader of the old version is fine
    report = store.collect_garbage(grace_s=3600)
    assert report.orphans == [] and store.blobs.exists(old.sha256)  # orphaned within the grace period
    report = store.collect_garbage(grace_s=0)
    assert report.orphans == [old.sha256] and not store.blobs.exists(old.sha256) and store.blobs.exists(new.sha256)
    with pytest.raises(UnknownAdapterError, match="no longer exists"):
        store.load_weights(old)  # that version is gone: 404, not a damaged store
    assert store.collect_garbage(grace_s=0).as_dict() == {"orphans": [], "leftovers": [], "temporary": 0,
                                                          "dangling": [], "kept_young": 0,
                                                          "changes_pruned": 0}  # idempotent
    store.delete("a")
    store.collect_garbage(grace_s=0)
    assert list(store.blobs.list()) == []


def test_a_collection_prunes_the_change_log_past_the_grace(store: AdapterStore):
    for seed in range(3):
        store.put(f"a{seed}", canonicalize(make_adapter(BERT_TARGETS, seed=seed)))
    store.delete("a0")
    latest = store.index.sequence()
    assert store.collect_garbage(grace_s=3600).changes_pruned == 0 and len(store.index.changes_since(0)) == 4
    assert store.collect_garbage(grace_s=0).changes_pruned == 3
    assert store.index.changes_since(latest - 1) == [(latest, "a0")] and store.index.sequence() == latest


def test_an_unreferenced_blob_is_a_leftover_once_older_than_the_grace(store: AdapterStore):
    kept = store.put("kept", canonicalize(make_adapter(BERT_TARGETS, seed=1)))
    stray = canonicalize(make_adapter(BERT_TARGETS, seed=2))
    store.blobs.put(stray.sha256, stray.files())  # a crash between the blob and the row
    report = store.collect_garbage(grace_s=3600)
    assert report.leftovers == [] and report.kept_young == 1 and store.blobs.exists(stray.sha256)
    report = store.collect_garbage(grace_s=0)
    assert report.leftovers == [stray.sha256] and [s for s, _ in store.blobs.list()] == [kept.sha256]


def test_a_blob_collected_during_a_put_is_written_again(store: AdapterStore, monkeypatch: pytest.MonkeyPatch):
    adapter = canonicalize(make_adapter(BERT_TARGETS, seed=1))
    real_put = store.index.put

    def collected_meanwhile(new, *, overwrite):
        store.blobs.delete(new.sha256)  # a concurrent collection removed the (orphaned) blob after step 1
        return real_put(new, overwrite=overwrite)

    monkeypatch.setattr(store.index, "put", collected_meanwhile)
    store.put("a", adapter)
    assert store.blobs.exists(adapter.sha256) and store.read_file("a", "adapter_config.json") == adapter.config_bytes


def test_a_row_whose_blob_is_missing_is_reported_and_kept(store: AdapterStore):
    record = store.put("a", canonicalize(make_adapter(BERT_TARGETS)))
    store.blobs.delete(record.sha256)  # damage from outside the service
    report = store.collect_garbage(grace_s=0)
    assert report.dangling == [record.sha256] and store.get("a") == record  # logged, never deleted
    with pytest.raises(MissingBlobError, match="missing"):
        store.load_weights("a")
    with pytest.raises(MissingBlobError):
        store.read_file("a", "adapter_model.safetensors")
    store.put("a", canonicalize(make_adapter(BERT_TARGETS)), overwrite=True)  # the repair: upload it again
    assert store.load_weights("a").targets() == sorted(BERT_TARGETS)


_CRASH = """
import os, signal, sys
sys.path[:0] = [{repo!r}, {testkit!r}, {here!r}]
from http_testkit import BERT_TARGETS, make_adapter
from storage_backends import open_blobs, open_index
from service.storage import AdapterStore, canonicalize
store = AdapterStore(open_index(*{index_spec!r}), open_blobs(*{blob_spec!r}))
store.put("kept", canonicalize(make_adapter(BERT_TARGETS, seed=1)))
def crash(*args, **kwargs):  # the blob is written and durable; die before the row, like kill -9
    os.kill(os.getpid(), signal.SIGKILL)
store.index.put = crash
store.put("{name}", canonicalize(make_adapter(BERT_TARGETS, seed=2)){extra})
"""


@pytest.mark.parametrize("stage", ["new", "overwrite"])
def test_a_kill_between_blob_and_row_leaves_the_old_state(index_spec, blob_spec, stage: str):
    name, extra = ("crashed", "") if stage == "new" else ("kept", ", overwrite=True")
    script = _CRASH.format(repo=str(REPO), testkit=str(TESTKIT), here=str(HERE), index_spec=tuple(index_spec),
                           blob_spec=tuple(blob_spec), name=name, extra=extra)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, timeout=180)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    store = AdapterStore(open_index(*index_spec), open_blobs(*blob_spec))
    try:
        kept = store.get("kept")
        assert [r.name for r in store.list()[0]] == ["kept"] and kept.version == 1  # the overwrite never happened
        stray = canonicalize(make_adapter(BERT_TARGETS, seed=2)).sha256
        assert store.blobs.exists(stray)  # the crash really came between the blob and the row
        assert store.collect_garbage(grace_s=3600).leftovers == []  # perhaps an upload in progress: kept
        assert store.collect_garbage(grace_s=0).leftovers == [stray]
        assert [s for s, _ in store.blobs.list()] == [kept.sha256]
        assert store.load_weights("kept").targets() == sorted(BERT_TARGETS)
    finally:
        store.close()
