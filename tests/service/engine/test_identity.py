"""Adapters are identified by content: a request runs with exactly the sha256 it resolved when it arrived.

An adapter overwritten behind the engine's back (another replica wrote the shared store; engine.forget() is
never called) is never served stale, a request that resolved the old version gets the old weights whole (or a
409 once they are gone), never a mix, and the answer names the version in `system_fingerprint`."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from service.engine import AdapterChangedError, Engine, load_base_model
from service.engine.identity import AdapterRef
from service.storage import canonicalize, local_store
from tests.service.engine.conftest import DictStore, hold_loop, random_adapter, settings

TARGETS = ["query", "value", "dense"]


def _engine(bert_dir, store, **overrides) -> Engine:
    return Engine(load_base_model(str(bert_dir), "cpu", "float32"), settings(**overrides), store)


def _reference(bert_dir, weights, text: str) -> list[list[float]]:
    """What `weights` alone answer, on an engine that never saw another version."""
    engine = _engine(bert_dir, DictStore())
    engine.store.items["ref"] = weights

    async def main():
        await engine.start()
        try:
            return (await engine.embed("ref", [text])).embeddings
        finally:
            await engine.stop()

    return asyncio.run(main())


@pytest.fixture()
def versions(bert_dir):
    base = load_base_model(str(bert_dir), "cpu", "float32")
    return random_adapter(base.model, TARGETS, seed=1), random_adapter(base.model, TARGETS, seed=2, rank=2)


def test_an_overwrite_behind_the_engines_back_is_never_served_stale(bert_dir, tmp_path, versions):
    old, new = versions
    store = local_store(tmp_path / "store")
    v1 = store.put("a0", canonicalize(old))
    engine = _engine(bert_dir, store, merge_policy="always")  # merged too: the merged adapter is keyed by content

    async def main():
        await engine.start()
        try:
            before = await engine.embed("a0", ["x"])  # v1 resident, merged, in the host cache
            v2 = await asyncio.to_thread(store.put, "a0", canonicalize(new), overwrite=True)  # no forget()
            after = await engine.embed("a0", ["x"])
            state = await engine.state(fingerprints=False)
            return before, after, v2, state
        finally:
            await engine.stop()

    before, after, v2, state = asyncio.run(main())
    assert before.system_fingerprint == f"a0@v1:{v1.sha256[:12]}"
    assert after.system_fingerprint == f"a0@v2:{v2.sha256[:12]}" and v2.sha256 != v1.sha256
    np.testing.assert_allclose(after.embeddings, _reference(bert_dir, new, "x"), atol=1e-5)
    np.testing.assert_allclose(before.embeddings, _reference(bert_dir, old, "x"), atol=1e-5)
    assert state["merged_adapter"] == "a0" and state["merged"]["version"] == 2
    store.close()


@pytest.mark.parametrize("forget", [False, True])
def test_a_request_that_resolved_the_old_version_gets_it_whole(bert_dir, tmp_path, versions, forget):
    """Queued before the overwrite (the loop busy meanwhile): answered by v1 entirely, with or without forget()."""
    old, new = versions
    store = local_store(tmp_path / "store")
    store.put("a0", canonicalize(old))
    engine = _engine(bert_dir, store, max_batch_tokens=8)  # several forwards for the request's rows
    texts = ["one two three four five", "x", "six seven eight nine", "a b c d e f"]

    async def main():
        await engine.start()
        try:
            await engine.embed("a0", ["warm"])  # v1 resident: the request carries no copy of its own
            hold = await hold_loop(engine.scheduler)
            pending = asyncio.ensure_future(engine.embed("a0", texts))
            while engine.scheduler.queue.qsize() == 0:
                await asyncio.sleep(0.005)
            await asyncio.to_thread(store.put, "a0", canonicalize(new), overwrite=True)
            if forget:
                engine.forget("a0", replaced=True)
            hold.set()
            return await pending
        finally:
            await engine.stop()

    result = asyncio.run(main())
    assert result.system_fingerprint.startswith("a0@v1:")
    for text, row in zip(texts, result.embeddings, strict=True):
        np.testing.assert_allclose([row], _reference(bert_dir, old, text), atol=1e-5)
    store.close()


def test_a_request_whose_version_is_gone_before_it_runs_gets_409(bert_dir, tmp_path, versions):
    """v1 overwritten, forgotten (off the device and the host cache) and its blob collected: nothing can
    serve v1 any more, and the request is not served v2 in its place."""
    old, new = versions
    store = local_store(tmp_path / "store")
    store.put("a0", canonicalize(old))
    engine = _engine(bert_dir, store)

    async def main():
        await engine.start()
        try:
            await engine.embed("a0", ["warm"])
            hold = await hold_loop(engine.scheduler)
            pending = asyncio.ensure_future(engine.embed("a0", ["x"]))
            while engine.scheduler.queue.qsize() == 0:
                await asyncio.sleep(0.005)
            await asyncio.to_thread(store.put, "a0", canonicalize(new), overwrite=True)
            await asyncio.to_thread(store.collect_garbage, 0)
            engine.forget("a0", replaced=True)
            hold.set()
            outcome = (await asyncio.gather(pending, return_exceptions=True))[0]
            return outcome, await engine.embed("a0", ["x"])
        finally:
            await engine.stop()

    outcome, after = asyncio.run(main())
    assert isinstance(outcome, AdapterChangedError) and "version 1" in str(outcome)
    assert after.system_fingerprint.startswith("a0@v2:")
    store.close()


def test_identical_bytes_under_two_names_share_one_cached_copy(bert_dir, tmp_path, versions):
    old, _ = versions
    store = local_store(tmp_path / "store")
    x, y = store.put("x", canonicalize(old)), store.put("y", canonicalize(old))
    engine = _engine(bert_dir, store)

    async def main():
        await engine.start()
        try:
            ex, ey = await engine.embed("x", ["t"]), await engine.embed("y", ["t"])
            return ex, ey, await engine.state(fingerprints=False)
        finally:
            await engine.stop()

    ex, ey, state = asyncio.run(main())
    assert x.sha256 == y.sha256 and ex.embeddings == ey.embeddings
    assert ex.system_fingerprint == f"x@v1:{x.sha256[:12]}" and ey.system_fingerprint == f"y@v1:{x.sha256[:12]}"
    assert len(state["resident"]) == 1 and state["resident_adapters"] == ["x"]  # y found x's copy resident
    assert state["host_cache_bytes"] == engine.weights.load(AdapterRef.of(y)).nbytes()  # one host entry, by sha
    store.close()


def test_the_base_answers_as_base(bert_dir):
    engine = _engine(bert_dir, DictStore())

    async def main():
        await engine.start()
        try:
            return await engine.embed("base", ["t"])
        finally:
            await engine.stop()

    assert asyncio.run(main()).system_fingerprint == "base"
