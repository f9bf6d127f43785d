"""The engine on a store that other servers write to: every request resolves its adapter in the index, so a
version replaced or deleted elsewhere (no `forget` here) is never served; when the index is unreachable, the
copies this engine holds keep serving, and anything else answers StorageUnavailableError (503)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from service.engine import Engine, UnknownAdapterError, load_base_model
from service.storage import StorageUnavailableError
from tests.service.engine.conftest import DictStore, random_adapter, settings

TARGETS = ["query", "value", "dense"]


class FlakyStore(DictStore):
    """A DictStore whose index can be made unreachable, noting which record each load asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.loaded: list[str] = []

    def resolve(self, name: str):
        if self.down:
            raise StorageUnavailableError("index", "PostgreSQL unreachable (test)")
        return super().resolve(name)

    get = resolve

    def load_weights(self, record):
        self.loaded.append(record.sha256)
        return super().load_weights(record)


def _engine(bert_dir, **overrides) -> Engine:
    base = load_base_model(str(bert_dir), "cpu", "float32")
    store = FlakyStore()
    store.items["a"] = random_adapter(base.model, TARGETS, seed=1)
    store.items["b"] = random_adapter(base.model, TARGETS, seed=2)
    return Engine(base, settings(**overrides), store)


def _embedding(result) -> np.ndarray:
    return np.array(result.embeddings)


def test_a_version_replaced_or_deleted_elsewhere_is_not_served(bert_dir):
    engine = _engine(bert_dir)
    new = random_adapter(engine.base.model, TARGETS, seed=9)

    async def main():
        await engine.start()
        try:
            old = await engine.embed("a", ["x"])  # resident from here on
            engine.store.items["a"] = new  # overwritten through another server: this engine is not told
            after = await engine.embed("a", ["x"])
            sha_after = engine.store.loaded[-1]
            del engine.store.items["a"]  # deleted through another server
            with pytest.raises(UnknownAdapterError):
                await engine.embed("a", ["x"])
            return old, after, sha_after
        finally:
            await engine.stop()

    old, after, sha_after = asyncio.run(main())
    assert not np.allclose(_embedding(old), _embedding(after), atol=1e-4)
    assert sha_after == f"a-{id(new)}"  # read by the record it resolved: the new version

    fresh = _engine(bert_dir)
    fresh.store.items["a"] = new

    async def reference():
        await fresh.start()
        try:
            return await fresh.embed("a", ["x"])
        finally:
            await fresh.stop()

    np.testing.assert_allclose(_embedding(after), _embedding(asyncio.run(reference())), atol=1e-5)


def test_held_copies_serve_while_the_index_is_unreachable(bert_dir):
    engine = _engine(bert_dir, device_cache_adapters=1)

    async def main():
        await engine.start()
        try:
            a = await engine.embed("a", ["x"])
            b = await engine.embed("b", ["x"])  # a goes back to host RAM (one resident adapter), b is resident
            engine.store.down = True
            b_down = await engine.embed("b", ["x"])  # resident
            a_down = await engine.embed("a", ["x"])  # in host RAM
            engine.weights.host.pop("b")
            await engine.scheduler.call(lambda: engine.weights.evict("b"))
            with pytest.raises(StorageUnavailableError):  # held nowhere: 503
                await engine.embed("b", ["x"])
            engine.store.down = False  # back: resolved again, and served
            b_back = await engine.embed("b", ["x"])
            return a, b, a_down, b_down, b_back
        finally:
            await engine.stop()

    a, b, a_down, b_down, b_back = asyncio.run(main())
    np.testing.assert_allclose(_embedding(a_down), _embedding(a), atol=1e-5)
    np.testing.assert_allclose(_embedding(b_down), _embedding(b), atol=1e-5)
    np.testing.assert_allclose(_embedding(b_back), _embedding(b), atol=1e-5)
