"""`lora-store gc`: the explicit collection, as a command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from http_testkit import BERT_TARGETS, make_adapter

from service.storage import canonicalize, local_store
from service.storage.cli import main


def test_gc_removes_orphans_and_changes_older_than_the_grace(tmp_path: Path, capsys: pytest.CaptureFixture):
    store = local_store(tmp_path)
    gone = store.put("gone", canonicalize(make_adapter(BERT_TARGETS, seed=1)))
    kept = store.put("kept", canonicalize(make_adapter(BERT_TARGETS, seed=2)))
    store.delete("gone")
    store.close()
    assert main(["gc", "--store", str(tmp_path)]) == 0  # the default grace: an hour
    report = json.loads(capsys.readouterr().out)
    assert report["orphans"] == [] and report["changes_pruned"] == 0
    assert main(["gc", "--store", str(tmp_path), "--grace-seconds", "0"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["orphans"] == [gone.sha256] and report["changes_pruned"] == 2  # all but the newest of three
    store = local_store(tmp_path)
    try:
        assert [s for s, _ in store.blobs.list()] == [kept.sha256] and store.count() == 1
        assert [name for _, name in store.index.changes_since(store.index.sequence() - 1)] == ["gone"]
    finally:
        store.close()


def test_gc_refuses_what_is_not_a_store(tmp_path: Path, capsys: pytest.CaptureFixture):
    assert main(["gc", "--store", str(tmp_path / "nothing")]) == 2
    assert "not a store" in capsys.readouterr().err and not (tmp_path / "nothing").exists()
    assert main(["gc", "--store", str(tmp_path), "--grace-seconds", "-1"]) == 2
