"""Batched decoding with a KV cache: a request's tokens do not depend on what shares its batch."""

from __future__ import annotations

import asyncio
import functools

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
        alone = [await engine.complete(r) for r in _requests(logprobs=2, **sampling)]
        together = await asyncio.gather(*[engine.complete(r) for r in _requests(logprobs=2, **sampling)])
        await engine.stop()
        return alone, together

    alone, together = asyncio.run(main())
    for a, b in zip(alone, together, strict=True):
        assert a.choice.tokens == b.choice.tokens and a.choice.text == b.choice.text
        assert a.choice.token_logprobs == pytest.approx(b.choice.token_logprobs, abs=1e-4)
        assert [list(d) for d in a.choice.top_logprobs] == [list(d) for d in b.choice.top_logprobs]
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
    model.forward = functools.wraps(forward)(lambda *a, **kw: calls.append(1) or forward(*a, **kw))
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


def test_a_long_prompt_with_few_tokens_beside_a_short_prompt_with_many(gpt2_dir):
    """The long row finishes first but rides along; its positions must not run past the position table."""
    engine = make_engine(gpt2_dir)
    tok, limit = engine.base.tokenizer, engine.base.max_length
    words = 1
    while len(tok(("hello " * (words + 1)).strip())["input_ids"]) <= limit - 4:
        words += 1
    long_prompt = ("hello " * words).strip()
    long_req = CompletionRequest(model="a0", prompt=long_prompt, max_tokens=2, temperature=0)
    short_req = CompletionRequest(model="a1", prompt="fox", max_tokens=limit - 8, temperature=0)

    async def main():
        await engine.start()
        alone = [await engine.complete(long_req), await engine.complete(short_req)]
        together = await asyncio.gather(engine.complete(long_req), engine.complete(short_req))
        await engine.stop()
        return alone, together

    alone, together = asyncio.run(main())
    assert [t.choice.text for t in together] == [a.choice.text for a in alone]
    assert together[1].completion_tokens + together[0].prompt_tokens > limit  # the case that used to crash


def test_a_tiny_temperature_is_greedy_not_nan(gpt2_dir):
    engine = make_engine(gpt2_dir)

    async def main():
        await engine.start()
        greedy = await engine.complete(CompletionRequest(model="a0", prompt="hello", max_tokens=6, temperature=0))
        tiny = await engine.complete(CompletionRequest(model="a0", prompt="hello", max_tokens=6, temperature=1e-40,
                                                       seed=1))
        await engine.stop()
        return greedy, tiny

    greedy, tiny = asyncio.run(main())
    assert tiny.choice.text == greedy.choice.text


class _Sink:
    def __init__(self):
        self.chunks, self.result = [], None

    def push(self, chunk):
        if chunk is not None:
            self.chunks.append(chunk)

    def resolve(self, result):
        self.result = result


def _decode_all(tok, ids, **request) -> tuple[object, _Sink]:
    """Feed `ids` to a row as if sampled, then complete it: (the row, what it streamed and answered)."""
    from service.engine.generation import Row, advance, complete

    sink = _Sink()
    req = CompletionRequest(model="a0", prompt="x", **{"max_tokens": len(ids), **request})
    row = Row(type("Item", (), {"payload": req, "push": sink.push, "resolve": sink.resolve})(), 1)
    for token in ids:
        advance(row, token, -0.5, {}, tok, frozenset())
        if row.finish:
            break
    complete(row)
    return row, sink


def test_streamed_text_never_splits_a_character_and_offsets_index_the_text(gpt2_dir):
    """Byte-level BPE: "é" is two byte tokens; the first alone decodes to U+FFFD, which must not be sent."""
    from service.base_model import load_base_model

    tok = load_base_model(str(gpt2_dir), "cpu", "float32").tokenizer
    text = "fox é and ☃!"
    ids = tok(text)["input_ids"]
    assert any("\ufffd" in tok.decode([i]) for i in ids), "the test needs tokens that split a character"
    row, sink = _decode_all(tok, ids)
    assert "".join(c.text for c in sink.chunks) == row.text == text
    assert all("\ufffd" not in c.text for c in sink.chunks)
    assert [o for c in sink.chunks for o in c.text_offsets] == row.offsets == sink.result.choice.text_offsets
    assert len(row.offsets) == len(ids) and row.offsets == sorted(row.offsets)
    for offset, token in zip(row.offsets, row.tokens, strict=True):
        if "\ufffd" not in token:
            assert text[offset:offset + len(token)] == token
        else:  # a byte of a split character starts where that character does
            assert text[offset] in "é☃"


def test_offsets_step_over_bytes_that_never_become_a_character(gpt2_dir):
    """A lone continuation byte decodes to U+FFFD for good: later tokens start after it, not on it."""
    from service.base_model import load_base_model

    tok = load_base_model(str(gpt2_dir), "cpu", "float32").tokenizer
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    unprintable = [b for b in range(256) if b not in printable]
    stray = tok.convert_tokens_to_ids(chr(256 + unprintable.index(0x80)))  # byte-level BPE's symbol for 0x80
    ids = tok("ab")["input_ids"] + [stray, stray] + tok("How")["input_ids"]  # 0x80 alone is never valid UTF-8
    row, sink = _decode_all(tok, ids)
    assert row.text == "ab\ufffd\ufffdHow"
    expected, at = [], 0
    for token in ids:  # each stray byte is one U+FFFD of its own
        expected.append(at)
        at += 1 if token == stray else len(tok.decode([token]))
    assert row.offsets == expected and expected[-len(tok("How")["input_ids"])] == 4
    assert [o for c in sink.chunks for o in c.text_offsets] == row.offsets


def test_streams_match_the_plain_answer_with_stop_strings_and_logprobs(gpt2_dir):
    """A stop string spanning several tokens must not leak its first part into the stream, and every
    token's logprob reaches the stream, including the last one and ones whose text was held back."""
    engine = make_engine(gpt2_dir)

    async def collect(req):
        chunks = [c async for c in engine.stream(req)]
        return ("".join(c.text for c in chunks), [t for c in chunks for t in c.tokens],
                [lp for c in chunks for lp in (c.token_logprobs or [])], chunks[-1].finish_reason,
                [top for c in chunks for top in (c.top_logprobs or [])])

    async def main():
        await engine.start()
        free = await engine.complete(CompletionRequest(model="a0", prompt="the quick", max_tokens=12, temperature=0))
        text = free.choice.text
        stops = [text[i:i + 4] for i in range(1, len(text) - 4, 3)] + ["zzzz"]
        pairs = []
        for stop in stops:
            req = dict(model="a0", prompt="the quick", max_tokens=12, temperature=0, stop=[stop], logprobs=3)
            pairs.append((await engine.complete(CompletionRequest(**req)),
                          await collect(CompletionRequest(**req, stream=True))))
        await engine.stop()
        return pairs

    pairs = asyncio.run(main())
    assert len(pairs) > 2
    for plain, (text, tokens, logprobs, finish, top) in pairs:
        assert text == plain.choice.text and finish == plain.choice.finish_reason
        assert tokens == plain.choice.tokens and logprobs == pytest.approx(plain.choice.token_logprobs)
        assert top == plain.choice.top_logprobs and len(top) == len(tokens)


def test_a_short_request_is_answered_before_its_long_batch_mate_ends(gpt2_dir):
    engine = make_engine(gpt2_dir, max_wait_ms=200)

    async def main():
        await engine.start()
        short = asyncio.ensure_future(engine.complete(CompletionRequest(model="a0", prompt="hi", max_tokens=1)))
        long = asyncio.ensure_future(engine.complete(CompletionRequest(model="a1", prompt="hi", max_tokens=100,
                                                                       temperature=0)))
        done, _ = await asyncio.wait({short, long}, return_when=asyncio.FIRST_COMPLETED)
        long_pending = not long.done()
        await long
        await engine.stop()
        return done, short, long_pending, long.result()

    done, short, long_pending, long_result = asyncio.run(main())
    assert done == {short} and long_pending
    assert short.result().completion_tokens == 1 and long_result.completion_tokens == 100


def test_a_request_that_races_a_stop_is_refused_not_left_waiting(gpt2_dir):
    from service.engine import EngineBusyError

    engine = make_engine(gpt2_dir)

    async def main():
        await engine.start()

        async def load_then_stop(name):  # the service stops while the adapter is being read
            engine.ready = False

        engine._ensure_loaded = load_then_stop
        with pytest.raises(EngineBusyError, match="shutting down"):
            await engine.complete(CompletionRequest(model="a0", prompt="hi", max_tokens=1))
        engine.ready = True
        await engine.stop()

    asyncio.run(main())


def test_the_earliest_stop_string_wins_and_offsets_stay_inside_the_text(gpt2_dir):
    from service.base_model import load_base_model
    from service.engine.generation import Row, advance

    tok = load_base_model(str(gpt2_dir), "cpu", "float32").tokenizer
    ids = tok("the quick brown fox")["input_ids"]
    text = tok.decode(ids)
    # "own" is one token holding both stops; the one earlier in the text ("ow") wins, not the first listed.
    sink = _Sink()
    row = Row(type("Item", (), {"payload": CompletionRequest(model="a0", prompt="x", max_tokens=len(ids),
                                                              stop=["n", "ow"]), "push": sink.push})(), 1)
    for token in ids:
        advance(row, token, -0.5, {}, tok, frozenset())
        if row.finish:
            break
    assert row.text == text[:text.index("ow")] and row.finish == "stop"
    assert all(0 <= o <= len(row.text) for o in row.offsets) and row.offsets == sorted(row.offsets)


def test_sampling_survives_extreme_but_valid_settings():
    import torch

    from service.engine.generation import sample

    logits = torch.tensor([1.0, 3.0, 2.0])
    gen = torch.Generator().manual_seed(0)
    assert sample(logits, 1.0, 1e-300, gen) == 1  # top_p below float32's range keeps the top token
    huge = torch.tensor([3e38, -3e38, 1e38])  # finite logits that overflow once divided by a small temperature
    assert sample(huge, 1e-5, 1.0, gen) == 0
    assert sample(huge, 2.0, 0.5, gen) == 0


def test_a_row_whose_sampling_fails_fails_alone(gpt2_dir, monkeypatch):
    from service.engine import decoding

    real = decoding.sample

    def failing(logits, temperature, top_p, gen):
        if temperature == 0.5:
            raise RuntimeError("this row's sampler broke")
        return real(logits, temperature, top_p, gen)

    monkeypatch.setattr(decoding, "sample", failing)
    engine = make_engine(gpt2_dir)
    good = dict(model="a0", prompt="hello", max_tokens=6, temperature=0)

    async def main():
        await engine.start()
        alone = await engine.complete(CompletionRequest(**good))
        results = await asyncio.gather(
            engine.complete(CompletionRequest(model="a1", prompt="hi", max_tokens=6, temperature=0.5)),
            engine.complete(CompletionRequest(**good)), return_exceptions=True)
        await engine.stop()
        return alone, results

    alone, (bad, ok) = asyncio.run(main())
    assert isinstance(bad, RuntimeError) and "sampler broke" in str(bad)
    assert ok.choice.tokens == alone.choice.tokens


def test_the_models_end_of_turn_tokens_stop_generation(gpt2_dir):
    """Instruct models end a turn with their own token (generation_config.eos_token_id), not only the
    tokenizer's EOS: both stop a row."""
    import torch

    from service.base_model import _stop_ids

    engine = make_engine(gpt2_dir)
    eos = engine.base.tokenizer.eos_token_id
    assert engine.base.stop_ids == {eos}
    ids = engine.base.tokenizer("the quick", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        first = int(engine.base.model(input_ids=ids).logits[0, -1].argmax())  # what greedy decoding picks first
    engine.base.stop_ids = frozenset({eos, first})

    async def main():
        await engine.start()
        out = await engine.complete(CompletionRequest(model="base", prompt="the quick", max_tokens=8, temperature=0))
        await engine.stop()
        return out

    out = asyncio.run(main())
    assert out.choice.finish_reason == "stop" and out.completion_tokens == 0 and out.choice.text == ""
    model = type("M", (), {"generation_config": type("G", (), {"eos_token_id": [5, 7]})()})()
    assert _stop_ids(model, type("T", (), {"eos_token_id": 3})()) == {3, 5, 7}


def test_a_special_token_reads_the_same_in_tokens_and_top_logprobs(gpt2_dir):
    from service.base_model import load_base_model

    tok = load_base_model(str(gpt2_dir), "cpu", "float32").tokenizer
    ids = tok("ab")["input_ids"] + [tok.eos_token_id] + tok("cd")["input_ids"]  # EOS that does not stop here
    row, sink = _decode_all(tok, ids)
    assert row.text == "abcd"  # special tokens never reach the text
    assert tok.eos_token in row.tokens  # but the token is named, as top_logprobs names it
