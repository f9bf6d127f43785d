"""Token-budget batching: forwards stay within rows × padded length ≤ max_batch_tokens, answers come back in
each request's order and equal to a one-text-at-a-time forward, a short request is not held back by a long
one queued before it, and generation prefills in budget-sized groups with unchanged tokens."""

from __future__ import annotations

import asyncio
import random
import threading

import numpy as np
import pytest

from service.engine import AdapterChangedError, CompletionRequest
from service.engine import scheduler as loop_module
from service.engine.budget import SMALL_WIDTH, RowQueue, plan
from service.engine.requests import EmbedResult
from service.settings import Settings
from tests.service.engine.conftest import hold_loop
from tests.service.engine.test_engine import make_engine

WORDS = "the quick brown fox jumps over the lazy dog while adapters stay small and fast".split()


def _text(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def _within_budget(widths: list[int], budget: int) -> bool:
    return len(widths) == 1 or len(widths) * max(widths) <= budget


# ---------------------------------------------------------------------------------------------- the planner
@pytest.mark.parametrize("seed", range(20))
def test_plan_keeps_every_row_once_within_the_budget_and_the_length_rule(seed):
    rng = random.Random(seed)
    lengths = [rng.choice([rng.randint(1, 40), rng.randint(1, 600)]) for _ in range(rng.randint(1, 300))]
    budget = rng.choice([16, 64, 512, 2048, 16384])
    groups = plan(lengths, budget)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for group in groups:
        widths = [lengths[i] for i in group]
        assert _within_budget(widths, budget)  # only a single row may exceed it, alone
        assert max(widths) <= SMALL_WIDTH or 2 * min(widths) >= max(widths)


def test_plan_puts_one_long_row_apart_from_many_short_ones():
    lengths = [12] * 200 + [512]
    # the short rows together, padded to 12 (not 512), and the long one alone
    assert plan(lengths, 16384) == [list(range(200)), [200]]


class FakeItem:
    """What RowQueue and Part read of a WorkItem; the outcome is recorded instead of sent to an event loop."""

    def __init__(self, lengths: list[int], at: float, kind: str = "embed", adapter: str | None = None) -> None:
        self.encoded = [[n] * n for n in lengths]  # a row's token ids: its length, repeated
        self.enqueued_at, self.kind, self.adapter, self.preloaded = at, kind, adapter, None
        self.abandoned, self.outcome = False, None

    def resolve(self, value) -> None:
        self.outcome = value

    def fail(self, exc) -> None:
        self.outcome = exc


def _run(parts) -> None:
    """A stand-in forward: each row's value is its token ids, so order mistakes show."""
    for part in parts:
        part.resolve(EmbedResult([list(r) for r in part.encoded], sum(map(len, part.encoded))))


def test_row_queue_answers_every_request_in_its_own_order_within_the_budget():
    rng = random.Random(0)
    items = [FakeItem([rng.randint(2, 120) for _ in range(rng.randint(1, 40))], at=i) for i in range(12)]
    queue = RowQueue(clock=iter(range(100, 10_000)).__next__)
    for item in items:
        queue.add(item)
    forwards = 0
    while queue:
        parts = queue.take(256)
        assert _within_budget([len(r) for p in parts for r in p.encoded], 256)
        _run(parts)
        forwards += 1
    for item in items:
        assert item.outcome == EmbedResult(item.encoded, sum(map(len, item.encoded)))
    assert forwards > 1


def test_a_newcomer_anchors_the_next_forward_and_long_requests_take_turns():
    queue = RowQueue(clock=iter(range(100, 10_000)).__next__)
    long_a, long_b = FakeItem([60] * 10, at=0), FakeItem([60] * 10, at=1)
    queue.add(long_a)
    queue.add(long_b)
    order = []
    for arrival in (None, FakeItem([4], at=50), None, None, None):  # the short one arrives during forward 1
        if arrival is not None:
            queue.add(arrival)
        parts = queue.take(120)  # two rows of 60, or the short row: 60-token rows may not pad it
        order.append([p.item for p in parts])
        _run(parts)
    short = order[2][0]
    # A ran, then whoever had waited longest: B (queued before the short one), the short one, then A again
    assert order == [[long_a], [long_b], [short], [long_a], [long_b]]
    assert short.outcome == EmbedResult([[4] * 4], 4) and long_a.outcome is None


def test_rows_of_other_requests_fill_the_forward_but_kinds_never_mix():
    queue = RowQueue(clock=iter(range(100, 10_000)).__next__)
    a, b, c = FakeItem([10, 12], at=0), FakeItem([11], at=1, kind="classify"), FakeItem([9, 14], at=2)
    for item in (a, b, c):
        queue.add(item)
    parts = queue.take(1024)
    assert [p.item for p in parts] == [a, c]
    assert [p.item for p in queue.take(1024)] == [b]


def test_a_slice_of_an_unfinished_request_never_pads_a_newcomers_forward():
    queue = RowQueue(clock=iter(range(100, 10_000)).__next__)
    big = FakeItem([10] * 30 + [300], at=0)
    queue.add(big)
    _run(queue.take(200))  # 20 rows of 10
    short = FakeItem([4], at=50)
    queue.add(short)
    # the 10 short rows left would fit beside it, but the big request needs another forward anyway
    assert [(p.item, len(p.rows)) for p in queue.take(200)] == [(short, 1)]
    small = FakeItem([12, 12], at=10**6)
    queue.add(small)
    # big's 10 rows of 10 (its 300 is too long for them), and small, which this forward finishes
    assert [(p.item, len(p.rows)) for p in queue.take(200)] == [(big, 10), (small, 2)]


def test_max_requests_bounds_the_requests_sharing_a_forward():
    queue = RowQueue(clock=iter(range(100, 10_000)).__next__)
    items = [FakeItem([5, 5], at=i) for i in range(5)]
    for item in items:
        queue.add(item)
    assert [p.item for p in queue.take(1024, max_requests=2)] == items[:2]
    assert [p.item for p in queue.take(1024, max_requests=1)] == items[2:3]


def test_a_failed_part_fails_its_request_once_and_drops_its_other_rows():
    queue = RowQueue(clock=iter(range(100, 10_000)).__next__)
    doomed, other = FakeItem([30, 30, 30], at=0), FakeItem([30], at=1)
    queue.add(doomed)
    queue.add(other)
    parts = queue.take(60)  # two of doomed's rows
    error = RuntimeError("boom")
    parts[0].fail(error)
    parts[0].fail(RuntimeError("again"))
    assert doomed.outcome is error
    rest = []
    while queue:
        rest += (parts := queue.take(60))
        _run(parts)
    assert [p.item for p in rest] == [other]


# ------------------------------------------------------------------------------------------------ the engine
def _record_forwards(monkeypatch, hook=None) -> list[list]:
    """Wrap the loop's run_batch: each forward's parts, as (item, row widths)."""
    forwards: list[list] = []
    real = loop_module.run_batch

    def recording(lm, base, parts):
        forwards.append([(getattr(p, "item", p), [len(r) for r in p.encoded]) for p in parts])
        if hook is not None:
            hook(len(forwards))
        return real(lm, base, parts)

    monkeypatch.setattr(loop_module, "run_batch", recording)
    return forwards


def test_mixed_lengths_and_adapters_equal_one_text_at_a_time_within_the_budget(bert_dir, monkeypatch):
    budget = 96
    calls = [(name, [_text(rng_n, seed=10 * i + j) for j, rng_n in enumerate(lengths)])
             for i, (name, lengths) in enumerate([("a0", [3, 90, 5, 40]), ("base", [2]), ("a1", [60, 1, 30, 8, 70]),
                                                  ("a2", [4]), ("a0", [100, 100])])]
    engine = make_engine(bert_dir, max_batch_tokens=budget)
    forwards = _record_forwards(monkeypatch)

    async def main():
        await engine.start()
        together = await asyncio.gather(*[engine.embed(name, texts) for name, texts in calls])
        n_forwards = len(forwards)
        alone = [[(await engine.embed(name, [t])).embeddings[0] for t in texts] for name, texts in calls]
        await engine.stop()
        return together, n_forwards, alone

    together, n_forwards, alone = asyncio.run(main())
    for result, one_by_one in zip(together, alone, strict=True):
        np.testing.assert_allclose(np.array(result.embeddings), np.array(one_by_one), atol=1e-5)
    assert n_forwards > 2  # split by the budget...
    assert all(_within_budget([w for _, ws in f for w in ws], budget) for f in forwards[:n_forwards])  # ...always
    token_counts = [r.prompt_tokens for r in together]
    assert token_counts == [sum(len(engine.base.tokenizer(t)["input_ids"]) for t in texts) for _, texts in calls]


def test_a_short_request_finishes_before_a_long_request_queued_before_it(bert_dir, monkeypatch):
    """The short request is queued while the long request's first forward runs (the forward waits for it, so
    this does not depend on timing); it is answered in the next forward, before the long one ends. Overtaking
    within a forward is off here: this is the turn between two forwards (test_overtake.py covers the other)."""
    engine = make_engine(bert_dir, max_batch_tokens=128, overtake_tokens=0)
    long_texts = [_text(60, seed=i) for i in range(12)]  # 62 tokens each: two rows per forward
    short_queued = threading.Event()
    forwards = _record_forwards(monkeypatch, hook=lambda n: n == 1 and short_queued.wait(30))
    finished: list[str] = []

    async def main():
        await engine.start()
        long = asyncio.ensure_future(engine.embed("base", long_texts))
        long.add_done_callback(lambda _: finished.append("long"))
        while not forwards:
            await asyncio.sleep(0.005)
        short = asyncio.ensure_future(engine.embed("base", ["hello"]))
        short.add_done_callback(lambda _: finished.append("short"))
        while engine.scheduler.queue.empty():  # queued behind the forward in flight
            await asyncio.sleep(0.005)
        short_queued.set()
        results = await asyncio.gather(short, long)
        n_forwards = len(forwards)
        solo = await engine.embed("base", ["hello"])
        await engine.stop()
        return solo, results, n_forwards

    solo, (short, long), n_forwards = asyncio.run(main())
    assert finished == ["short", "long"]
    short_forward = next(i for i, f in enumerate(forwards) if any(len(ws) == 1 and ws[0] < 8 for _, ws in f))
    assert short_forward == 1 and n_forwards > 3  # the very next forward; the long request had more to run
    np.testing.assert_allclose(short.embeddings, solo.embeddings, atol=1e-6)
    assert len(long.embeddings) == 12


def test_a_request_whose_adapter_is_replaced_between_its_forwards_fails(bert_dir, monkeypatch):
    """Its remaining rows would run on the new weights: a mixed answer. It gets a 409 instead."""
    engine = make_engine(bert_dir, max_batch_tokens=128)
    replaced = threading.Event()
    _record_forwards(monkeypatch, hook=lambda n: n == 2 and replaced.wait(30))  # the first is the warm-up

    async def main():
        await engine.start()
        await engine.embed("a0", ["warm"])
        pending = asyncio.ensure_future(engine.embed("a0", [_text(60, seed=i) for i in range(4)]))
        while engine.scheduler.queue.qsize() or not engine.scheduler.rows:
            await asyncio.sleep(0.005)
        engine.forget("a0", replaced=True)  # as PUT ?overwrite=true does
        replaced.set()
        outcome = (await asyncio.gather(pending, return_exceptions=True))[0]
        after = await engine.embed("a0", ["still served"])
        await engine.stop()
        return outcome, after

    outcome, after = asyncio.run(main())
    assert isinstance(outcome, AdapterChangedError)
    assert len(after.embeddings) == 1


def test_classify_rows_split_across_forwards_keep_their_order(bert_dir, monkeypatch):
    import torch

    from tests.service.engine.conftest import random_adapter

    engine = make_engine(bert_dir, max_batch_tokens=64)
    headed = random_adapter(engine.base.model, ["query", "value"], seed=9)
    headed.modules_to_save = {"classifier.weight": torch.randn(3, 32, generator=torch.Generator().manual_seed(3)),
                              "classifier.bias": torch.zeros(3)}
    headed.config.modules_to_save = ["classifier"]
    engine.store.items["headed"] = headed
    texts = [_text(n, seed=n) for n in (50, 2, 30, 9, 45, 1)]
    forwards = _record_forwards(monkeypatch)

    async def main():
        await engine.start()
        together = await engine.classify("headed", texts)
        n_forwards = len(forwards)
        alone = [(await engine.classify("headed", [t])).results[0] for t in texts]
        await engine.stop()
        return together, n_forwards, alone

    together, n_forwards, alone = asyncio.run(main())
    assert n_forwards > 1
    for got, want in zip(together.results, alone, strict=True):
        assert [r["label"] for r in got] == [r["label"] for r in want]
        assert [r["score"] for r in got] == pytest.approx([r["score"] for r in want], abs=1e-5)


def test_prefill_in_budget_groups_gives_the_same_tokens(gpt2_dir, monkeypatch):
    engine = make_engine(gpt2_dir, max_batch_tokens=24)
    prompts = ["hi", "the quick brown fox jumps over the lazy dog " * 2, "hello", "the lazy dog",
               "hello world, adapters are small " * 2, "fox"]
    requests = [dict(model=m, prompt=p, max_tokens=6, temperature=0, logprobs=1)
                for m, p in zip(["a0", "base", "a1", "a0", "a2", "base"], prompts, strict=True)]
    groups: list[list[int]] = []
    join = engine.scheduler.decoder.join

    def recording_join(items):
        groups.append([len(it.encoded[0]) for it in items])
        join(items)

    async def main():
        await engine.start()
        alone = [await engine.complete(CompletionRequest(**r)) for r in requests]
        engine.scheduler.decoder.join = recording_join
        hold = await hold_loop(engine.scheduler)  # the loop waits until all six are queued: one group of six
        together = asyncio.gather(*[engine.complete(CompletionRequest(**r)) for r in requests])
        while engine.scheduler.queue.qsize() < len(requests):
            await asyncio.sleep(0.005)
        hold.set()
        together = await together
        await engine.stop()
        return alone, together

    alone, together = asyncio.run(main())
    for a, b in zip(alone, together, strict=True):
        assert a.choice.tokens == b.choice.tokens and a.choice.text == b.choice.text
        assert a.choice.token_logprobs == pytest.approx(b.choice.token_logprobs, abs=1e-4)
    assert len(groups) > 1 and sum(map(len, groups)) == len(requests)
    assert all(_within_budget(g, 24) for g in groups)


def test_max_batch_tokens_setting(monkeypatch):
    assert Settings().max_batch_tokens is None  # the engine picks by device (budget.default_budget)
    monkeypatch.setenv("LORA_MAX_BATCH_TOKENS", "4096")
    assert Settings().max_batch_tokens == 4096
    with pytest.raises(ValueError):
        Settings(max_batch_tokens=0)
