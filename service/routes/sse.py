"""Server-sent events for streamed generation, shared by completions and chat completions.

    data: {...}        one event per chunk, rendered by the route in its own shape
    data: {...}        on a failure mid-stream, the error body (the status line has gone out already)
    data: [DONE]

The first chunk is awaited before the response starts, so what fails at once (an unknown adapter, the
wrong task, no chat template) still gets its proper status code.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi.responses import StreamingResponse

from service.engine import CompletionChunk, Engine
from service.engine import CompletionRequest as EngineCompletion
from service.errors import error_body
from service.schemas import Usage

__all__ = ["data", "usage_event", "stream_response"]

Render = Callable[[CompletionChunk], str]  # a chunk -> its event(s), in the route's own shape


def data(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def usage_event(meta: dict[str, Any], chunk: CompletionChunk) -> str:
    """OpenAI's stream_options.include_usage: after the final chunk, an event with no choices and the counts."""
    return "" if chunk.usage is None else data({**meta, "choices": [], "usage": Usage.of(*chunk.usage).model_dump()})


async def stream_response(engine: Engine, request: EngineCompletion, render: Render,
                          opening: Render | None = None) -> StreamingResponse:
    """`opening(first chunk)`: an event to send before the first chunk's own (chat's assistant role)."""
    chunks = engine.stream(request)
    first = await anext(chunks)
    return StreamingResponse(_events(first, chunks, render, opening), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _events(first: CompletionChunk, rest: AsyncIterator[CompletionChunk], render: Render,
                  opening: Render | None) -> AsyncIterator[str]:
    try:
        if opening is not None:
            yield opening(first)
        yield render(first)
        async for chunk in rest:
            yield render(chunk)
    except Exception as exc:  # noqa: BLE001 - the status line is gone; report in-band
        yield data(error_body(exc))
    finally:
        await rest.aclose()
    yield "data: [DONE]\n\n"
