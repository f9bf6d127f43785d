"""POST /v1/chat/completions (OpenAI-compatible), for causal LMs whose tokenizer has a chat template.

The messages go to the engine as they are; it renders them with the template in a worker thread and
decodes them like any completion (batched continuously with every other request, whatever adapter).
"""

from __future__ import annotations

import time
import uuid

from fastapi.responses import StreamingResponse

from service.chat_schemas import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatResponseMessage,
    ChatTokenLogprob,
    ChatTopLogprob,
)
from service.deps import EngineDep
from service.engine import CompletionChunk, CompletionResult
from service.engine import CompletionRequest as EngineCompletion
from service.routes import inference_router
from service.routes.sse import data, stream_response, usage_event
from service.schemas import Usage

__all__ = ["router"]

router = inference_router()


@router.post("/chat/completions", response_model=ChatCompletionResponse,
             summary="Answer a conversation (OpenAI-compatible), with the base model's chat template",
             responses={200: {"content": {"text/event-stream": {}},
                              "description": "JSON, or with stream=true, server-sent events"}})
async def chat_completions(body: ChatCompletionRequest, engine: EngineDep
                           ) -> ChatCompletionResponse | StreamingResponse:
    request = EngineCompletion(model=body.model, prompt="", messages=[m.as_template_input() for m in body.messages],
                               max_tokens=body.limit(), temperature=body.temperature, top_p=body.top_p,
                               seed=body.seed, stop=body.stops(), logprobs=body.logprobs_wanted(), stream=body.stream)
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model}
    if body.stream:
        def opening(first: CompletionChunk) -> str:  # the version that answers is known once the request resolved
            meta["system_fingerprint"] = first.system_fingerprint
            return _event(meta, {"role": "assistant", "content": ""})

        return await stream_response(engine, request, lambda chunk: _events(chunk, meta, body.include_usage()),
                                     opening)
    result: CompletionResult = await engine.complete(request)
    c = result.choice
    logprobs = _logprobs(c.tokens, c.token_logprobs, c.top_logprobs) if c.token_logprobs is not None else None
    choice = ChatChoice(index=0, message=ChatResponseMessage(content=c.text), logprobs=logprobs,
                        finish_reason=c.finish_reason)
    return ChatCompletionResponse(**meta, choices=[choice], usage=Usage.of(result.prompt_tokens,
                                                                           result.completion_tokens),
                                  system_fingerprint=result.system_fingerprint)


def _logprobs(tokens: list[str], logprobs: list[float], tops: list[dict[str, float]] | None) -> ChatLogprobs:
    """OpenAI's chat shape: per token its text, logprob, UTF-8 bytes and the likeliest alternatives."""
    def alternatives(top: dict[str, float]) -> list[ChatTopLogprob]:
        return [ChatTopLogprob(token=k, logprob=v, bytes=list(k.encode())) for k, v in top.items()]

    tops = tops or [{} for _ in tokens]
    return ChatLogprobs(content=[
        ChatTokenLogprob(token=t, logprob=lp, bytes=list(t.encode()), top_logprobs=alternatives(top))
        for t, lp, top in zip(tokens, logprobs, tops, strict=True)])


def _event(meta: dict, delta: dict, finish: str | None = None, logprobs: ChatLogprobs | None = None) -> str:
    choice = {"index": 0, "delta": delta, "logprobs": logprobs.model_dump() if logprobs else None,
              "finish_reason": finish}
    return data({**meta, "object": "chat.completion.chunk", "choices": [choice]})


def _events(chunk: CompletionChunk, meta: dict, include_usage: bool) -> str:
    """A content delta (with its tokens' logprobs), then the finish reason on the last chunk, and with
    stream_options.include_usage the counts; the assistant role went out first, in the opening event."""
    logprobs = None
    if chunk.token_logprobs is not None and chunk.tokens:
        logprobs = _logprobs(chunk.tokens, chunk.token_logprobs, chunk.top_logprobs)
    out = _event(meta, {"content": chunk.text}, logprobs=logprobs) if chunk.text or logprobs else ""
    if chunk.finish_reason is not None:
        out += _event(meta, {}, chunk.finish_reason)
    if include_usage:
        out += usage_event({**meta, "object": "chat.completion.chunk"}, chunk)
    return out
