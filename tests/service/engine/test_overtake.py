"""Overtaking at layer boundaries (service/engine/overtake.py): a short request queued while a long forward runs
is answered inside a pause of that forward, with the embedding it gets alone, and the long forward's own result
is unchanged. What may not run in the pause (a load, a control, a request over the budget) runs afterwards, in
its order. The long forward is held at its first block until the newcomers are queued, so nothing here depends
on timing."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from service.engine import overtake as overtake_module
from service.engine.errors import InternalEngineError
from service.engine.overtake import transformer_blocks
from tests.service.engine.conftest import hold_loop
from tests.service.engine.test_engine import make_engine

WORDS = "the quick brown fox jumps over the lazy dog while adapters stay small and fast".split()
LONG = " ".join(WORDS[i % len(WORDS)] for i in range(100))  # 102 tokens
SHORT = "hello"  # 3 tokens


class Recorder:
    def __init__(self) -> None:
        self.values: list[float] = []

    def observe(self, value: float) -> None:
        self.values.append(value)


class Gate:
    """Holds the first forward of more than 50 tokens at its first transformer block until `release()`."""

    def __init__(self, engine) -> None:
        self.inside, self.opened, self.used = threading.Event(), threading.Event(), False
        transformer_blocks(engine.base.model)[0].register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, _module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if not self.used and hidden.shape[1] > 50:
            self.used = True
            self.inside.set()
            self.opened.wait(30)

    async def held(self) -> None:
        assert await asyncio.to_thread(self.inside.wait, 30)

    def release(self) -> None:
        self.opened.set()


async def queued(engine, n: int) -> None:
    """Until the loop's queue holds n items (it is paused, so nothing takes them)."""
    for _ in range(3000):
        if engine.scheduler.queue.qsize() >= n:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"{n} items never queued")


def track(finished: list[str], label: str, coro) -> asyncio.Future:
    future = asyncio.ensure_future(coro)
    future.add_done_callback(lambda _: finished.append(label))
    return future


async def start_long(engine, longs: list[str], gate: Gate, finished: list[str]) -> list[asyncio.Future]:
    """The long requests, queued together so that they share one forward, held at its first block."""
    hold = await hold_loop(engine.scheduler)
    futures = [track(finished, f"long {name}", engine.embed(name, [LONG])) for name in longs]
    await queued(engine, len(longs))
    hold.set()
    await gate.held()
    return futures


@pytest.mark.parametrize("longs, shorts", [(["a0", "base"], ["a1", "base"]), (["a0"], ["a1", "base"]),
                                           (["a0", "base"], ["a1"])],
                         ids=["routed long, routed short", "one-adapter long", "one-adapter short"])
def test_a_short_request_overtakes_a_long_forward_with_the_results_it_gets_alone(bert_dir, longs, shorts):
    engine = make_engine(bert_dir, max_batch_tokens=256)
    gate, finished = Gate(engine), []
    observed = SimpleNamespace(batch_size=Recorder(), forward_seconds=Recorder())
    engine.scheduler.overtaker.metrics = observed  # what the overtaking forward reports

    async def main():
        await engine.start()
        for name in ("a0", "a1"):
            await engine.embed(name, ["warm"])  # resident: they may overtake
        long_futures = await start_long(engine, longs, gate, finished)
        short_futures = [track(finished, f"short {name}", engine.embed(name, [SHORT])) for name in shorts]
        await queued(engine, len(shorts))
        gate.release()
        together = await asyncio.gather(*long_futures, *short_futures)
        alone = [await engine.embed(name, [LONG]) for name in longs] + [await engine.embed(n, [SHORT]) for n in shorts]
        await engine.stop()
        return together, alone

    together, alone = asyncio.run(main())
    assert set(finished[:len(shorts)]) == {f"short {n}" for n in shorts}  # answered inside the long forward
    assert observed.batch_size.values == [len(shorts)] and len(observed.forward_seconds.values) == 1
    for got, want in zip(together, alone, strict=True):
        np.testing.assert_allclose(got.embeddings, want.embeddings, atol=1e-6)


def test_loads_controls_and_large_requests_wait_for_the_forward_and_keep_their_order(bert_dir):
    """Queued in the pause: a short base request (overtakes), one on a non-resident adapter and one over the
    overtake budget (both after the forward), a merge, and a short one on a resident adapter queued after the
    merge: it must see the merge, so it does not overtake either."""
    engine = make_engine(bert_dir, max_batch_tokens=256, overtake_tokens=16)
    gate, finished = Gate(engine), []
    big = " ".join(WORDS[:12])  # 14 tokens: fits 16 alone, not beside the short one

    async def main():
        await engine.start()
        for name in ("a0", "a1"):
            await engine.embed(name, ["warm"])
        (long,) = await start_long(engine, ["a0"], gate, finished)
        steps = [("short base", lambda: engine.embed("base", [SHORT])),
                 ("big base", lambda: engine.embed("base", [big])),
                 ("short a2", lambda: engine.embed("a2", [SHORT])),  # never used: not resident
                 ("merge a1", lambda: engine.merge("a1")),
                 ("short a1", lambda: engine.embed("a1", [SHORT]))]
        futures = []
        for n, (label, call) in enumerate(steps, 1):
            futures.append(track(finished, label, call()))
            await queued(engine, n)
        assert not engine.weights.is_resident(await engine.resolve("a2"))
        gate.release()
        results = await asyncio.gather(long, *futures)
        alone = [await engine.embed("a0", [LONG]), await engine.embed("base", [SHORT]),
                 await engine.embed("base", [big]), await engine.embed("a2", [SHORT]), None,
                 await engine.embed("a1", [SHORT])]
        await engine.stop()
        return results, alone

    results, alone = asyncio.run(main())
    assert finished[:2] == ["short base", "long a0"]
    assert finished.index("merge a1") < finished.index("short a1")
    assert set(finished[2:]) == {"big base", "short a2", "merge a1", "short a1"}
    assert results[4]["merged_adapter"] == "a1"
    for got, want in zip(results, alone, strict=True):
        if want is not None:
            np.testing.assert_allclose(got.embeddings, want.embeddings, atol=1e-5)  # a1 ran merged


def test_an_overtaking_forward_that_fails_fails_only_its_own_requests(bert_dir, monkeypatch):
    engine = make_engine(bert_dir, max_batch_tokens=256)
    gate, finished = Gate(engine), []

    def broken(*_args):
        raise RuntimeError("boom")

    monkeypatch.setattr(overtake_module, "admissible", broken)

    async def main():
        await engine.start()
        (long,) = await start_long(engine, ["base"], gate, finished)
        short = track(finished, "short base", engine.embed("base", [SHORT]))
        await queued(engine, 1)
        gate.release()
        outcome = await asyncio.gather(short, return_exceptions=True)
        result, alone = await long, await engine.embed("base", [LONG])
        await engine.stop()
        return outcome[0], result, alone

    outcome, result, alone = asyncio.run(main())
    assert finished[0] == "short base" and isinstance(outcome, InternalEngineError)
    np.testing.assert_allclose(result.embeddings, alone.embeddings, atol=1e-6)


def test_overtake_tokens_0_turns_it_off(bert_dir):
    engine = make_engine(bert_dir, max_batch_tokens=256, overtake_tokens=0)
    gate, finished = Gate(engine), []

    async def main():
        await engine.start()
        (long,) = await start_long(engine, ["base"], gate, finished)
        short = track(finished, "short base", engine.embed("base", [SHORT]))
        await queued(engine, 1)
        gate.release()
        await asyncio.gather(long, short)
        await engine.stop()

    asyncio.run(main())
    assert finished == ["long base", "short base"]


def test_the_blocks_are_found_whatever_the_family(bert_dir, gpt2_dir):
    from service.engine import load_base_model

    bert = load_base_model(str(bert_dir), "cpu", "float32").model
    gpt2 = load_base_model(str(gpt2_dir), "cpu", "float32").model
    assert transformer_blocks(bert) is bert.encoder.layer
    assert transformer_blocks(gpt2) is gpt2.transformer.h
    assert transformer_blocks(torch.nn.Linear(2, 2)) is None
