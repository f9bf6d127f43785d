"""The device tier's eviction order: by decayed use counts (default) or least recently used."""

from __future__ import annotations

import asyncio

import pytest

from service.engine import Engine, load_base_model
from service.engine.eviction import UseCounts, eviction_order
from tests.service.engine.conftest import DictStore, random_adapter, settings


def test_use_counts_are_halved_every_period():
    counts = UseCounts(period=10)
    counts.add({"a": 6, "b": 3})
    assert (counts["a"], counts["b"], counts["c"]) == (6, 3, 0)
    counts.add({"c": 1})  # the tenth use: everything halves, and a count of 1 fades out
    assert (counts["a"], counts["b"], counts["c"]) == (3, 1, 0)
    assert len(counts) == 2


def test_eviction_order_by_count_keeps_lru_order_among_ties():
    counts = UseCounts(period=100)
    counts.add({"hot": 5, "warm": 2, "x": 1, "y": 1})
    lru_first = ["hot", "x", "warm", "y"]  # least recently used first
    assert eviction_order(lru_first, "frequency", counts) == ["x", "y", "warm", "hot"]
    assert eviction_order(lru_first, "lru", counts) == lru_first


@pytest.mark.parametrize("policy, kept", [("frequency", {"a0", "a1", "a4"}), ("lru", {"a2", "a3", "a4"})])
def test_rare_adapters_do_not_push_out_frequent_ones(bert_dir, policy, kept):
    base = load_base_model(str(bert_dir), "cpu", "float32")
    store = DictStore()
    for i in range(5):
        store.items[f"a{i}"] = random_adapter(base.model, ["query", "value"], seed=i, rank=4)
    engine = Engine(base, settings(device_cache_adapters=3, device_cache_eviction=policy), store)

    async def main():
        await engine.start()
        for _ in range(4):  # a0 and a1 are popular...
            for name in ("a0", "a1"):
                await engine.embed(name, ["x"])
        for name in ("a2", "a3", "a4"):  # ...then three adapters come by once each
            await engine.embed(name, ["x"])
        state = await engine.state(fingerprints=False)
        await engine.stop()
        return state

    state = asyncio.run(main())
    # Frequency: each one-off takes the slot the previous one-off held, and the popular pair stays resident.
    # LRU keeps the last three, so the popular pair's next requests would both be cold loads.
    assert set(state["resident_adapters"]) == kept


def test_labels_of_adapters_long_gone_are_dropped(bert_dir):
    base = load_base_model(str(bert_dir), "cpu", "float32")
    store = DictStore()
    for i in range(12):
        store.items[f"a{i}"] = random_adapter(base.model, ["query"], seed=i, rank=2)
    engine = Engine(base, settings(device_cache_adapters=1, merge_window=2), store)

    async def main():
        await engine.start()
        for i in range(12):
            await engine.embed(f"a{i}", ["x"])
        await engine.stop()

    asyncio.run(main())
    labels = engine.weights._names
    assert len(labels) <= 2 * (1 + 2) and "a11" in labels.values()  # bounded; the latest still named
