"""Correctness under batching: every request's output equals the same request run alone, whatever mix
of adapters shares its batch, and whatever merges and switches happen meanwhile."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from service.engine import (
    BadRequestError,
    CompletionRequest,
    Engine,
    EngineBusyError,
    UnknownAdapterError,
    WrongTaskError,
    load_base_model,
)
from service.engine.requests import WorkItem
from tests.service.engine.conftest import DictStore, random_adapter, settings

TEXTS = [["hello world"], ["adapters are small", "a second, longer text in the same request"], ["the fox"],
         ["lazy dog jumps"], ["x"]]
NAMES = ["a0", "a1", "base", "a2", "a3"]


def run(coro):
    return asyncio.run(coro)


def make_engine(model_dir, n_adapters=4, **overrides):
    base = load_base_model(str(model_dir), "cpu", "float32")
    store = DictStore()
    targets = ["c_attn", "c_proj"] if base.task == "generate" else ["query", "value", "dense"]
    for i in range(n_adapters):
        store.items[f"a{i}"] = random_adapter(base.model, targets, seed=i, rank=2 + 2 * (i % 3))
    return Engine(base, settings(**overrides), store)


async def _alone(engine, calls):
    return [await engine.embed(name, texts) for name, texts in calls]


async def _together(engine, calls):
    return await asyncio.gather(*[engine.embed(name, texts) for name, texts in calls])


def _close(a, b, atol=1e-5):
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(np.array(x.embeddings), np.array(y.embeddings), atol=atol)


def test_mixed_batch_equals_each_request_alone(bert_dir):
    engine = make_engine(bert_dir)
    calls = list(zip(NAMES * 3, TEXTS * 3, strict=True))

    async def main():
        await engine.start()
        alone = await _alone(engine, calls)
        together = await _together(engine, calls)
        await engine.stop()
        return alone, together

    alone, together = run(main())
    _close(alone, together)
    # and the adapters really do something: a0's output differs from the base's
    assert not np.allclose(alone[0].embeddings, run(_base_only(bert_dir, calls[0][1]))[0].embeddings, atol=1e-3)


async def _base_only(model_dir, texts):
    engine = make_engine(model_dir, n_adapters=0)
    await engine.start()
    out = [await engine.embed("base", texts)]
    await engine.stop()
    return out


def test_mode_switches_under_load_change_no_result(bert_dir):
    engine = make_engine(bert_dir)
    calls = list(zip(NAMES * 4, TEXTS * 4, strict=True))

    async def main():
        await engine.start()
        reference = await _alone(engine, calls)
        pristine = (await engine.state())["pristine_fingerprint"]
        outs = []
        for target in ["a0", "a1", "a1", None, "a3", "a0"]:
            load = asyncio.gather(*[engine.embed(n, t) for n, t in calls])
            switch = engine.merge(target) if target else engine.unmerge()
            results, state = await asyncio.gather(load, switch)
            outs.append(results)
            assert state["merged_adapter"] == target
        await engine.unmerge()
        final = await engine.state(fingerprints=True)
        await engine.stop()
        return reference, outs, pristine, final

    reference, outs, pristine, final = run(main())
    for results in outs:
        _close(reference, results, atol=2e-5)
    assert final["fingerprint"] == final["pristine_fingerprint"] == pristine


def test_auto_policy_merges_a_hot_adapter_and_unmerges_when_traffic_mixes(bert_dir):
    engine = make_engine(bert_dir, merge_policy="auto", merge_window=8, merge_min_dwell=2, max_wait_ms=0)

    async def main():
        await engine.start()
        for _ in range(12):
            await engine.embed("a1", ["hot"])
        hot = await engine.state(fingerprints=False)
        for i in range(16):
            await engine.embed(NAMES[i % len(NAMES)], ["mixed"])
        mixed = await engine.state(fingerprints=False)
        await engine.stop()
        return hot, mixed

    hot, mixed = run(main())
    assert hot["merged_adapter"] == "a1" and hot["mode"] == "merged"
    assert mixed["merged_adapter"] is None
    assert mixed["merge_policy"]["auto_switches"] == 2  # once in, once out: no thrashing


def test_device_and_host_tiers_evict_by_their_bounds(bert_dir):
    engine = make_engine(bert_dir, n_adapters=6, device_cache_adapters=2)
    one = engine.store.items["a0"].nbytes()
    engine.weights.host.max_bytes = int(2.5 * one)

    async def main():
        await engine.start()
        for i in range(6):
            await engine.embed(f"a{i}", ["x"])
        state = await engine.state(fingerprints=False)
        again = await engine.embed("a0", ["x"])  # evicted everywhere: reloaded from the store, same answer
        first = await engine.embed("a0", ["x"])
        await engine.stop()
        return state, again, first

    state, again, first = run(main())
    assert len(state["resident_adapters"]) == 2 and state["resident_adapters"] == ["a4", "a5"]
    # a4 (rank 4) fits the host tier; a5 (rank 6, 3x a0's bytes) is larger than the whole tier
    assert state["host_cache_bytes"] <= 2.5 * one and state["host_cached_adapters"] == ["a4"]
    _close([again], [first])


def test_forget_drops_a_merged_adapter_and_restores_the_base(bert_dir):
    engine = make_engine(bert_dir)

    async def main():
        await engine.start()
        await engine.merge("a2")
        engine.store.items.pop("a2")
        engine.forget("a2")
        state = await engine.state()
        with pytest.raises(UnknownAdapterError):
            await engine.embed("a2", ["x"])
        await engine.stop()
        return state

    state = run(main())
    assert state["merged_adapter"] is None and "a2" not in state["resident_adapters"]
    assert state["fingerprint"] == state["pristine_fingerprint"]


def test_errors_fail_only_their_own_request(bert_dir):
    engine = make_engine(bert_dir)

    async def main():
        await engine.start()
        results = await asyncio.gather(engine.embed("a0", ["ok"]), engine.embed("missing", ["x"]),
                                       return_exceptions=True)
        with pytest.raises(WrongTaskError):
            await engine.complete(CompletionRequest(model="base", prompt="hi"))
        await engine.stop()
        return results

    ok, missing = run(main())
    assert isinstance(missing, UnknownAdapterError)
    assert len(ok.embeddings[0]) == 32


def test_a_headless_classify_request_fails_alone_in_its_batch(bert_dir):
    """On a bare encoder only adapters with a classifier head classify; the others are refused one by one."""
    import torch

    engine = make_engine(bert_dir)
    headed = random_adapter(engine.base.model, ["query", "value"], seed=9)
    gen = torch.Generator().manual_seed(3)
    headed.modules_to_save = {"classifier.weight": torch.randn(3, 32, generator=gen),
                              "classifier.bias": torch.zeros(3)}
    headed.config.modules_to_save = ["classifier"]
    engine.store.items["headed"] = headed

    async def main():
        await engine.start()
        results = await asyncio.gather(engine.classify("headed", ["ok"]), engine.classify("a0", ["no head"]),
                                       engine.classify("headed", ["also ok"]), engine.classify("base", ["base"]),
                                       return_exceptions=True)
        await engine.stop()
        return results

    first, headless, second, base = run(main())
    assert isinstance(headless, BadRequestError) and "adapter 'a0' carries no classifier head" in str(headless)
    assert isinstance(base, BadRequestError) and str(base).startswith("the base model is not a classifier")
    for result in (first, second):
        assert len(result.results[0]) == 3 and abs(sum(r["score"] for r in result.results[0]) - 1) < 1e-5


def test_a_batch_needing_more_adapters_than_the_device_tier_holds(bert_dir):
    """Loading the batch's third adapter must not evict the first two that the same forward needs."""
    engine = make_engine(bert_dir, device_cache_adapters=1)
    calls = [("a0", ["x"]), ("a1", ["y"]), ("a2", ["z"]), ("base", ["w"])]

    async def main():
        await engine.start()
        alone = await _alone(engine, calls)
        together = await _together(engine, calls)
        state = await engine.state(fingerprints=False)
        await engine.stop()
        return alone, together, state

    alone, together, state = run(main())
    _close(alone, together)
    assert len(state["resident_adapters"]) == 1  # back within the bound once the batch is done


def test_a_request_after_an_overwrite_never_sees_the_old_weights(bert_dir):
    """The eviction that follows an overwrite runs before requests gathered into the same batch."""
    engine = make_engine(bert_dir, max_wait_ms=300)
    new = random_adapter(engine.base.model, ["query", "value", "dense"], seed=77, rank=2)

    async def main():
        await engine.start()
        old = await engine.embed("a0", ["x"])  # a0 is now resident
        opener = asyncio.ensure_future(engine.embed("a1", ["y"]))  # starts a gather window
        await asyncio.sleep(0.05)
        engine.store.items["a0"] = new  # what PUT ?overwrite=true does, then it calls forget()
        engine.forget("a0")
        after = await engine.embed("a0", ["x"])
        await opener
        await engine.stop()
        return old, after

    old, after = run(main())
    fresh = make_engine(bert_dir, n_adapters=0)
    fresh.store.items["a0"] = new

    async def reference():
        await fresh.start()
        result = await fresh.embed("a0", ["x"])
        await fresh.stop()
        return result

    _close([after], [run(reference())])
    assert not np.allclose(np.array(old.embeddings), np.array(after.embeddings), atol=1e-4)


def test_auto_policy_serves_an_unmergeable_adapter_unmerged(gpt2_dir):
    """GPT-2's lm_head is tied to the embeddings: the policy's merge is refused, logged, and the batch runs."""
    import torch

    import adapters as A

    engine = make_engine(gpt2_dir, merge_policy="auto", merge_window=4, merge_min_dwell=1, max_wait_ms=0)
    gen = torch.Generator().manual_seed(5)
    vocab, hidden = engine.base.model.lm_head.weight.shape
    engine.store.items["tied"] = A.LoraWeights(A.LoraConfig(r=2, lora_alpha=4, target_modules=["lm_head"]),
                                               {"lm_head": (torch.randn(2, hidden, generator=gen),
                                                            torch.randn(vocab, 2, generator=gen))})
    request = CompletionRequest(model="tied", prompt="hello", max_tokens=3, temperature=0)

    async def main():
        await engine.start()
        results = [await engine.complete(request) for _ in range(8)]
        state = await engine.state()
        await engine.stop()
        return results, state

    results, state = run(main())
    assert len({r.choice.text for r in results}) == 1 and results[0].completion_tokens > 0
    assert state["merged_adapter"] is None and state["merge_policy"]["refused"] == ["tied"]
    assert state["fingerprint"] == state["pristine_fingerprint"]


def test_requests_queued_behind_a_stop_are_answered_not_left_hanging(bert_dir):
    engine = make_engine(bert_dir)

    async def main():
        await engine.start()
        await engine.embed("a0", ["warm"])
        hold = threading.Event()
        engine.scheduler.call_soon(hold.wait)  # keep the loop busy, so the stop and a request queue up behind it
        stopping = asyncio.ensure_future(engine.stop())
        await asyncio.sleep(0.05)
        loop = asyncio.get_running_loop()
        item = WorkItem("embed", "a0", ["late"], loop.create_future(), loop)
        engine.scheduler.queue.put(item)  # a request that raced the stop
        hold.set()
        await stopping
        return await asyncio.wait_for(asyncio.gather(item.future, return_exceptions=True), 5)

    (late,) = run(main())
    assert isinstance(late, EngineBusyError) and "shutting down" in str(late)


def test_auto_policy_never_evicts_the_running_batchs_adapters(bert_dir):
    """With room for one resident adapter, a policy merge of the hot a0 must not evict a1 mid-batch."""
    engine = make_engine(bert_dir, merge_policy="auto", merge_window=10, merge_min_dwell=1, device_cache_adapters=1,
                         max_wait_ms=0)

    async def main():
        await engine.start()
        for _ in range(9):
            await engine.embed("a0", ["hot"])
        result = await engine.embed("a1", ["cold"])
        await engine.stop()
        return result

    assert len(run(main()).embeddings[0]) == 32


def test_a_policy_merge_that_fails_to_load_does_not_fail_the_batch(bert_dir):
    """The window [a0 x 9, a1] makes `auto` want a0 merged, but a0 was evicted and its store read fails."""
    engine = make_engine(bert_dir, merge_policy="auto", merge_window=10, merge_min_dwell=1, max_wait_ms=0)
    load = engine.store.load_weights

    async def main():
        await engine.start()
        for _ in range(9):
            await engine.embed("a0", ["hot"])
        await engine.scheduler.call(lambda: engine.weights.evict("a0"))  # a0 must be read again for the merge...
        engine.weights.host.pop("a0")
        engine.store.load_weights = lambda ref: (_ for _ in ()).throw(OSError("disk error")) if ref.name == "a0" \
            else load(ref)  # ...and the disk fails
        result = await engine.embed("a1", ["unrelated"])
        await engine.stop()
        return result

    assert len(run(main()).embeddings[0]) == 32


def test_the_loop_thread_never_reads_the_store(bert_dir):
    """Even with no host tier, a cold adapter is read once, off the loop, and handed to it."""
    engine = make_engine(bert_dir, host_cache_bytes=0)
    calls = []
    load = engine.store.load_weights
    engine.store.load_weights = lambda name: calls.append(threading.current_thread().name) or load(name)

    async def main():
        await engine.start()
        await engine.embed("a0", ["x"])
        await engine.stop()

    run(main())
    assert len(calls) == 1 and calls[0] != "lora-engine"


def test_validation_reads_a_snapshot_not_the_live_tree(bert_dir):
    """Workers validate while the loop thread wraps layers: walking the live tree could race it."""
    engine = make_engine(bert_dir)

    def walking(*_a, **_k):
        raise AssertionError("validation walked the live module tree")

    engine.base.model.named_modules = walking
    engine.base.model.named_parameters = walking
    assert engine.validate(engine.store.items["a0"]).targets()


def test_controls_after_stop_and_bounds_after_a_failed_group(gpt2_dir):
    engine = make_engine(gpt2_dir, device_cache_adapters=1)
    too_long = [CompletionRequest(model=f"a{i}", prompt="hello " * 200, max_tokens=4) for i in range(4)]

    async def main():
        await engine.start()
        results = await asyncio.gather(*[engine.complete(r) for r in too_long], return_exceptions=True)
        state = await engine.state(fingerprints=False)
        await engine.stop()
        with pytest.raises(EngineBusyError):
            await engine.state()
        with pytest.raises(EngineBusyError):
            await engine.merge("a0")
        return results, state

    results, state = run(main())
    assert all(isinstance(r, BadRequestError) for r in results)
    assert len(state["resident_adapters"]) <= 1


def test_max_tokens_zero_is_answered_alone_and_in_a_batch(gpt2_dir):
    engine = make_engine(gpt2_dir)

    async def main():
        await engine.start()
        alone = await asyncio.wait_for(engine.complete(CompletionRequest(model="a0", prompt="hi", max_tokens=0)), 30)
        mixed = await asyncio.wait_for(asyncio.gather(
            engine.complete(CompletionRequest(model="a0", prompt="hi", max_tokens=0)),
            engine.complete(CompletionRequest(model="a1", prompt="hi", max_tokens=3, temperature=0))), 30)
        await engine.stop()
        return alone, mixed

    alone, (zero, three) = run(main())
    assert (alone.choice.text, alone.completion_tokens, alone.choice.finish_reason) == ("", 0, "length")
    assert zero.completion_tokens == 0 and three.completion_tokens == 3


def test_an_encoder_is_refused_as_a_generation_base(bert_dir, gpt2_dir):
    """--task generate on an encoder would load a random LM head and answer fluent-looking noise."""
    from service.base_model import BaseModelError

    with pytest.raises(BaseModelError, match="no trained language-model head|not causal"):
        load_base_model(str(bert_dir), "cpu", "float32", task="generate")
    assert load_base_model(str(gpt2_dir), "cpu", "float32", task="generate").task == "generate"
