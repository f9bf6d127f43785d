"""Continuous batching: requests join a running decode between steps, leave it when they finish, and get
the same tokens as when run alone, whatever joins, leaves, merges or is deleted meanwhile."""

from __future__ import annotations

import asyncio

import pytest

from service.engine import AdapterChangedError, CompletionRequest
from service.engine import decoding as decoding_module
from tests.service.engine.test_engine import make_engine

LONG = dict(model="a1", prompt="hi", max_tokens=100, temperature=0, logprobs=1)


def _req(**kw) -> CompletionRequest:
    return CompletionRequest(**kw)


async def _running(engine, request: CompletionRequest):
    """Start a streamed request and return once it has produced its first chunk (it is decoding)."""
    chunks = engine.stream(request)
    first = await anext(chunks)

    async def rest():
        got = [first] + [c async for c in chunks]
        return "".join(c.text for c in got), [t for c in got for t in c.tokens]

    return asyncio.ensure_future(rest())


def _same(a, b) -> None:
    assert a.choice.tokens == b.choice.tokens and a.choice.text == b.choice.text
    assert a.choice.token_logprobs == pytest.approx(b.choice.token_logprobs, abs=1e-4)


def test_a_request_joins_a_running_decode_and_is_answered_first(gpt2_dir):
    engine = make_engine(gpt2_dir)
    # longer than LONG's prompt: the running cache is padded on the left to take it
    short = dict(model="a0", prompt="the quick brown fox jumps", max_tokens=3, temperature=0, logprobs=1)

    async def main():
        await engine.start()
        solo_long, solo_short = await engine.complete(_req(**LONG)), await engine.complete(_req(**short))
        long = await _running(engine, _req(**LONG, stream=True))
        joined = await engine.complete(_req(**short))
        long_still_running = not long.done()
        text, tokens = await long
        await engine.stop()
        return solo_long, solo_short, joined, long_still_running, text, tokens

    solo_long, solo_short, joined, long_still_running, text, tokens = asyncio.run(main())
    assert long_still_running  # answered mid-decode: it did not wait for the 100-token request
    _same(joined, solo_short)
    assert (text, tokens) == (solo_long.choice.text, solo_long.choice.tokens)
    assert solo_long.completion_tokens == 100


def test_staggered_arrivals_with_mixed_adapters_and_lengths_equal_each_request_alone(gpt2_dir):
    engine = make_engine(gpt2_dir)
    prompts = ["hello", "the quick brown fox jumps over the lazy dog", "adapters", "hello world, adapters are"]
    requests = [dict(model=m, prompt=p, max_tokens=n, temperature=t, seed=s, logprobs=1)
                for m, p, n, t, s in zip(["a0", "base", "a2", "a3", "a1", "a0"], prompts + prompts[:2],
                                         [30, 5, 17, 9, 24, 2], [0, 0.9, 0, 0.7, 0, 0.8], [None, 3, None, 5, None, 9],
                                         strict=True)]

    async def main():
        await engine.start()
        alone = [await engine.complete(_req(**r)) for r in requests]
        futures = []
        for r in requests:  # each arrives while the earlier ones decode
            futures.append(asyncio.ensure_future(engine.complete(_req(**r))))
            await asyncio.sleep(0.01)
        together = await asyncio.gather(*futures)
        await engine.stop()
        return alone, together

    alone, together = asyncio.run(main())
    for a, b in zip(alone, together, strict=True):
        _same(a, b)


def test_merges_and_switches_between_steps_change_no_token(gpt2_dir):
    engine = make_engine(gpt2_dir)

    async def main():
        await engine.start()
        solo = await engine.complete(_req(**LONG))
        long = await _running(engine, _req(**LONG, stream=True))
        for name in ("a1", "a0", None, "a1"):  # merge its own adapter, another one, none, its own again
            await (engine.merge(name) if name else engine.unmerge())
            await asyncio.sleep(0.005)
        text, tokens = await long
        state = await engine.state()
        await engine.unmerge()
        restored = await engine.state()
        await engine.stop()
        return solo, text, tokens, state, restored

    solo, text, tokens, state, restored = asyncio.run(main())
    assert state["merged_adapter"] == "a1"
    assert (text, tokens) == (solo.choice.text, solo.choice.tokens)
    assert restored["fingerprint"] == restored["pristine_fingerprint"]


def test_deleting_an_adapter_fails_its_running_rows_only(gpt2_dir):
    engine = make_engine(gpt2_dir)

    async def main():
        await engine.start()
        solo = await engine.complete(_req(model="a0", prompt="hello", max_tokens=40, temperature=0))
        doomed = await _running(engine, _req(**LONG, stream=True))
        other = asyncio.ensure_future(engine.complete(_req(model="a0", prompt="hello", max_tokens=40,
                                                           temperature=0)))
        await asyncio.sleep(0.01)
        del engine.store.items["a1"]
        engine.forget("a1")  # what DELETE /v1/adapters/a1 does after the store forgets it
        with pytest.raises(AdapterChangedError, match="'a1' was deleted while this request was generating"):
            await doomed
        result = await other
        await engine.stop()
        return solo, result, [ref.name for ref, _ in engine.weights.tiers.resident.values()]

    solo, result, resident = asyncio.run(main())
    _same(result, solo)
    assert "a1" not in resident


def test_running_rows_keep_their_adapters_resident_beyond_the_bound(gpt2_dir):
    engine = make_engine(gpt2_dir, device_cache_adapters=1)
    short = dict(model="a0", prompt="hello", max_tokens=4, temperature=0, logprobs=1)

    async def main():
        await engine.start()
        solo_long, solo_short = await engine.complete(_req(**LONG)), await engine.complete(_req(**short))
        long = await _running(engine, _req(**LONG, stream=True))
        joined = await engine.complete(_req(**short))  # a0 comes in while a1's row runs: a1 must stay
        text, tokens = await long
        await asyncio.sleep(0.05)
        resident = [ref.name for ref, _ in engine.weights.tiers.resident.values()]
        await engine.stop()
        return solo_long, solo_short, joined, text, tokens, resident

    solo_long, solo_short, joined, text, tokens, resident = asyncio.run(main())
    _same(joined, solo_short)
    assert (text, tokens) == (solo_long.choice.text, solo_long.choice.tokens)
    assert len(resident) <= 1  # back within the bound once the rows ended


def test_a_cache_that_cannot_be_spliced_makes_newcomers_wait(gpt2_dir, monkeypatch):
    engine = make_engine(gpt2_dir)
    short = dict(model="a0", prompt="hello", max_tokens=3, temperature=0, logprobs=1)

    async def main():
        await engine.start()
        solo = await engine.complete(_req(**short))
        monkeypatch.setattr(decoding_module, "_kv_layers", lambda cache: None)
        long = await _running(engine, _req(**LONG, stream=True))
        joined = await engine.complete(_req(**short))
        long_done_first = long.done()
        await long
        await engine.stop()
        return solo, joined, long_done_first

    solo, joined, long_done_first = asyncio.run(main())
    assert long_done_first  # static batching: the newcomer waited for the running decode to end
    _same(joined, solo)


def test_stop_lets_the_running_decode_finish(gpt2_dir):
    engine = make_engine(gpt2_dir)

    async def main():
        await engine.start()
        long = await _running(engine, _req(**LONG, stream=True))
        await engine.stop()
        return await long

    text, tokens = asyncio.run(main())
    assert len(tokens) == 100


def test_the_running_decode_never_holds_more_than_max_batch_size_rows(gpt2_dir):
    engine = make_engine(gpt2_dir, max_batch_size=2)
    requests = [dict(model=m, prompt=p, max_tokens=n, temperature=0, logprobs=1)
                for m, p, n in (("a0", "hello", 12), ("a1", "the quick", 20), ("a2", "fox", 6), ("base", "hi", 9))]
    widths = []
    step = engine.scheduler.decoder.step

    def counting_step():
        widths.append(engine.scheduler.decoder.running())
        step()

    async def main():
        await engine.start()
        alone = [await engine.complete(_req(**r)) for r in requests]
        engine.scheduler.decoder.step = counting_step
        together = await asyncio.gather(*[engine.complete(_req(**r)) for r in requests])
        await engine.stop()
        return alone, together

    alone, together = asyncio.run(main())
    for a, b in zip(alone, together, strict=True):
        _same(a, b)
    assert max(widths) == 2 and len(widths) < sum(r["max_tokens"] for r in requests)  # full, and shared


def test_a_decode_kept_busy_by_overlapping_requests_never_outgrows_its_longest_row(gpt2_dir):
    """Each request joins while the previous one still runs, so the decode never empties for ~170 steps,
    more than the model's 128 positions: padding no row needs is cut, so the cache stays short."""
    engine = make_engine(gpt2_dir)
    requests = [dict(model=f"a{i % 4}", prompt=["hi", "hello world"][i % 2], max_tokens=50, temperature=0)
                for i in range(5)]
    widths = []
    step = engine.scheduler.decoder.step

    def measuring_step():
        widths.append(engine.scheduler.decoder._mask.shape[1])
        step()

    async def chained():
        results = []
        for r in requests:
            chunks = engine.stream(_req(**r, stream=True))
            seen, got = 0, []
            async for chunk in chunks:  # let it run 30 tokens (or to its end), then start the next one
                got.append(chunk)
                seen += len(chunk.tokens)
                if seen >= 30:
                    break
            results.append((chunks, got))
        out = []
        for chunks, got in results:
            got += [c async for c in chunks]
            out.append([t for c in got for t in c.tokens])
        return out

    async def main():
        await engine.start()
        alone = [(await engine.complete(_req(**r))).choice.tokens for r in requests]
        engine.scheduler.decoder.step = measuring_step
        together = await chained()
        await engine.stop()
        return alone, together

    alone, together = asyncio.run(main())
    assert together == alone
    assert len(widths) > 128 and max(widths) <= max(len(t) for t in alone) + 3  # prompts are at most 3 tokens


def test_only_a_plain_dynamic_cache_is_spliced(gpt2_dir):
    """A cache layer of any other type may hold per-row state besides keys and values (a sliding window, a
    Mamba state, indexer keys) that a splice would leave at the old batch size: such models get static batches."""
    import torch
    from transformers.cache_utils import DynamicLayer

    from service.engine.decoding import _kv_layers
    from service.engine.runner import routing

    engine = make_engine(gpt2_dir)
    ids = torch.tensor([[1, 2, 3]])
    with torch.inference_mode(), routing(engine.weights.lm, [None]):
        cache = engine.base.model(input_ids=ids, use_cache=True).past_key_values
    assert _kv_layers(cache) is not None and len(_kv_layers(cache)) == 2

    class WithMoreState(DynamicLayer):
        pass

    cache.layers[1].__class__ = WithMoreState
    assert _kv_layers(cache) is None


def test_a_call_with_many_prompts_does_not_hold_back_a_later_one(gpt2_dir):
    """Waiting generation requests take turns by the call they came from: one HTTP request carrying six
    prompts gets one row per turn beside a later single request, not all six ahead of it."""
    engine = make_engine(gpt2_dir, max_batch_size=2)
    finished = []

    async def one(name, **kw):
        await engine.complete(_req(model="a0", prompt="hello", temperature=0, **kw))
        finished.append(name)

    async def main():
        await engine.start()
        await engine.complete(_req(model="a0", prompt="hello", max_tokens=1))  # adapter resident, warm
        big = [asyncio.ensure_future(one(f"big{i}", max_tokens=40, origin="big")) for i in range(6)]
        for _ in range(500):  # until two big prompts decode and four wait: "small" comes strictly after them
            if len(engine.scheduler.waiting) == 4:
                break
            await asyncio.sleep(0.002)
        assert len(engine.scheduler.waiting) == 4
        small = asyncio.ensure_future(one("small", max_tokens=40, origin="small"))
        await asyncio.gather(*big, small)
        await engine.stop()

    asyncio.run(main())
    # FIFO would run all four waiting big prompts first (small last, at 6); taking turns, small runs in the
    # next turn, beside one of them, and ends third or fourth.
    assert finished.index("small") <= 3, finished
