"""Batched decoding with a KV cache: a request's tokens do not depend on what shares its batch."""

from __future__ import annotations

import asyncio

import pytest

from service.engine import BadRequestError, CompletionRequest
from tests.service.engine.test_engine import make_engine

PROMPTS = ["the quick brown", "hello", "adapters are small and the lazy dog", "fox"]


def _requests(**kw):
    return [CompletionRequest(model=m, prompt=p, max_tokens=8, **kw)
            for m, p in zip(["a0", "base", "a1", "a2"] * 2, PROMPTS * 2, strict=True)]


@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=0.9, top_p=0.8, seed=7)])
def test_batched_generation_equals_each_request_alone(gpt2_dir, sampling):
    engine = make_engine(gpt2_dir)

    async def main():
        await engine.start()
        alone = [await engine.complete(r) for r in _requests(logprobs=True, **sampling)]
        together = await asyncio.gather(*[engine.complete(r) for r in _requests(logprobs=True, **sampling)])
        await engine.stop()
        return alone, together

    alone, together = asyncio.run(main())
    for a, b in zip(alone, together, strict=True):
        assert a.choice.tokens == b.choice.tokens and a.choice.text == b.choice.text
        assert a.choice.token_logprobs == pytest.approx(b.choice.token_logprobs, abs=1e-4)
        assert a.completion_tokens == len(a.choice.token_logprobs) <= 8
    # different adapters on the same prompt give different continuations (the adapters are live)
    assert len({r.choice.text for r in alone[::4] + alone[1::4]}) > 1


def test_streaming_under_batching_yields_the_same_text(gpt2_dir):
    engine = make_engine(gpt2_dir)

    async def collect(req):
        return "".join([c.text async for c in engine.stream(req)])

    async def main():
        await engine.start()
        full = [await engine.complete(r) for r in _requests(temperature=0.0)]
        streamed = await asyncio.gather(*[collect(r) for r in _requests(temperature=0.0)])
        await engine.stop()
        return full, streamed

    full, streamed = asyncio.run(main())
    assert [f.choice.text for f in full] == streamed


def test_stop_strings_and_length_limit(gpt2_dir):
    engine = make_engine(gpt2_dir)

    async def main():
        await engine.start()
        free = await engine.complete(CompletionRequest(model="a0", prompt="hello", max_tokens=12, temperature=0))
        stop = free.choice.text[2:4] or free.choice.text[:1]
        cut = await engine.complete(CompletionRequest(model="a0", prompt="hello", max_tokens=12, temperature=0,
                                                      stop=[stop]))
        with pytest.raises(BadRequestError):
            await engine.complete(CompletionRequest(model="a0", prompt="hello " * 40, max_tokens=100))
        await engine.stop()
        return free, cut, stop

    free, cut, stop = asyncio.run(main())
    assert free.choice.finish_reason == "length" and free.completion_tokens == 12
    assert stop not in cut.choice.text and free.choice.text.startswith(cut.choice.text)
    assert cut.choice.finish_reason == "stop"


def test_an_over_long_prompt_fails_alone_in_its_batch(gpt2_dir):
    engine = make_engine(gpt2_dir)
    good = [CompletionRequest(model=m, prompt="hello", max_tokens=4, temperature=0) for m in ("a0", "base")]

    async def main():
        await engine.start()
        alone = [await engine.complete(r) for r in good]
        together = await asyncio.gather(*[engine.complete(r) for r in good],
                                        engine.complete(CompletionRequest(model="a1", prompt="hello " * 40,
                                                                          max_tokens=100)),
                                        return_exceptions=True)
        await engine.stop()
        return alone, together

    alone, (ok0, ok1, bad) = asyncio.run(main())
    assert isinstance(bad, BadRequestError) and "context" in str(bad)
    assert [ok0.choice.text, ok1.choice.text] == [a.choice.text for a in alone]


def test_a_stream_whose_client_leaves_stops_decoding(gpt2_dir):
    engine = make_engine(gpt2_dir)
    model = engine.base.model
    calls = []
    forward = model.forward
    model.forward = lambda *a, **kw: calls.append(1) or forward(*a, **kw)
    request = dict(model="a0", prompt="hello", max_tokens=100, temperature=0)

    async def main():
        await engine.start()
        full = await engine.complete(CompletionRequest(**request))
        steps_full = len(calls)
        chunks = engine.stream(CompletionRequest(**request))
        await anext(chunks)
        await chunks.aclose()  # what Starlette does when the client disconnects
        await engine.complete(CompletionRequest(model="base", prompt="hi", max_tokens=1))  # after that batch
        await engine.stop()
        return full, steps_full

    full, steps_full = asyncio.run(main())
    assert full.completion_tokens == 100 and steps_full == 100  # the request alone runs every step
    steps_abandoned = len(calls) - steps_full - 2  # minus the last request's prefill and its one step
    assert steps_abandoned < 50
