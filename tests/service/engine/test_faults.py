"""A fault of the server is never the request's: an unexpected error raised by a batch's forward answers the
request that caused it with a 500 (InternalEngineError), logged with its traceback, while its batch-mates get
their answers. Errors that are the request's own keep their statuses."""

from __future__ import annotations

import asyncio
import functools
import logging

import pytest

from adapters.errors import AdapterMismatchError, UnknownAdapterError
from service.engine import BadRequestError, CompletionRequest
from service.engine.errors import AdapterChangedError, InternalEngineError, NonFiniteOutputError, request_error
from service.errors import status_of
from tests.service.engine.test_engine import make_engine

POISON = "#"  # one byte-level token that none of the other texts holds


def _poison(engine, error: Exception, *, steps: bool = False) -> None:
    """The model's forward raises `error` for any batch holding the poison token (with `steps`: for every
    decode step instead), as a routing bug in a layer would."""
    model, forward = engine.base.model, engine.base.model.forward
    (token,) = engine.base.tokenizer(POISON, add_special_tokens=False)["input_ids"]

    def failing(*args, **kwargs):
        ids = kwargs["input_ids"]  # (B, T)
        if (ids.shape[1] == 1) if steps else bool((ids == token).any()):
            raise error
        return forward(*args, **kwargs)

    model.forward = functools.wraps(forward)(failing)


def _logged(caplog: pytest.LogCaptureFixture, error: Exception) -> bool:
    return any(r.levelno == logging.ERROR and r.exc_info and r.exc_info[1] is error for r in caplog.records)


@pytest.mark.parametrize("error, status", [(AdapterMismatchError("route() named 3 rows, but this forward has 27"), 500),
                                           (RuntimeError("a kernel failed"), 500),
                                           (BadRequestError("the request's own fault"), 400)])
def test_a_forward_fault_in_an_embed_batch_fails_its_own_request_with_500(bert_dir, caplog, error, status):
    engine = make_engine(bert_dir)
    calls = [("a0", ["hello world"]), ("a1", [f"the {POISON} fox"]), ("base", ["lazy dog"])]

    async def main():
        await engine.start()
        alone = [await engine.embed(name, texts) for name, texts in calls[::2]]
        _poison(engine, error)
        together = await asyncio.gather(*[engine.embed(name, texts) for name, texts in calls], return_exceptions=True)
        await engine.stop()
        return alone, together

    alone, (ok0, bad, ok1) = asyncio.run(main())
    assert status_of(bad) == status
    if status == 500:
        assert isinstance(bad, InternalEngineError) and bad.__cause__ is error and _logged(caplog, error)
        assert "the fault is not in the request" in bad.message
    else:
        assert bad is error
    assert [ok0.embeddings, ok1.embeddings] == [a.embeddings for a in alone]


def test_a_prefill_fault_fails_only_the_request_that_caused_it(gpt2_dir, caplog):
    engine = make_engine(gpt2_dir)
    error = AdapterMismatchError("route() named 3 rows, but this forward has 27")
    good = [CompletionRequest(model=m, prompt=p, max_tokens=4, temperature=0) for m, p in [("a0", "hello"),
                                                                                           ("base", "the fox")]]

    async def main():
        await engine.start()
        alone = [await engine.complete(r) for r in good]
        _poison(engine, error)
        poisoned = CompletionRequest(model="a1", prompt=f"hello {POISON}", max_tokens=4, temperature=0)
        together = await asyncio.gather(engine.complete(good[0]), engine.complete(poisoned), engine.complete(good[1]),
                                        return_exceptions=True)
        await engine.stop()
        return alone, together

    alone, (ok0, bad, ok1) = asyncio.run(main())
    assert isinstance(bad, InternalEngineError) and status_of(bad) == 500 and bad.__cause__ is error
    assert _logged(caplog, error)
    assert [ok0.choice.tokens, ok1.choice.tokens] == [a.choice.tokens for a in alone]


def test_a_decode_step_fault_is_a_500_and_the_engine_serves_on(gpt2_dir, caplog):
    engine = make_engine(gpt2_dir)
    error = AdapterMismatchError("route() named 2 rows, but this forward has 3")
    requests = [CompletionRequest(model=m, prompt="hello", max_tokens=4, temperature=0) for m in ("a0", "base")]

    async def main():
        await engine.start()
        forward = engine.base.model.forward
        _poison(engine, error, steps=True)
        failed = await asyncio.gather(*[engine.complete(r) for r in requests], return_exceptions=True)
        engine.base.model.forward = forward
        after = await engine.complete(requests[0])
        await engine.stop()
        return failed, after

    failed, after = asyncio.run(main())
    assert all(isinstance(f, InternalEngineError) and status_of(f) == 500 for f in failed)
    assert _logged(caplog, error) and after.completion_tokens == 4


@pytest.mark.parametrize("own", [BadRequestError("prompt too long"), UnknownAdapterError("deleted", key="a0"),
                                 NonFiniteOutputError("a0"), AdapterChangedError("a0", replaced=True)],
                         ids=lambda e: type(e).__name__)
def test_the_requests_own_errors_keep_their_statuses(own, caplog):
    status = status_of(own)
    assert request_error(own) is own and status_of(request_error(own)) == status < 500
    assert not caplog.records
