"""OpenAI-compatible inference. `model` names an adapter, or `base` for none. Inference or admin keys.

    POST /v1/completions   causal LMs; `stream: true` answers server-sent events ending in `data: [DONE]`
    POST /v1/embeddings    encoders, pooled and normalised as their sentence-transformers files say
    POST /v1/classify      classifiers, or an encoder adapter carrying a classifier head
    GET  /v1/models        the base and every stored adapter
    GET  /v1/models/{id}   one of them (404 for an unknown id)

Every inference answer carries `system_fingerprint` (OpenAI's field): which weights answered, as
"<adapter>@v<version>:<sha256[:12]>" for the version the request resolved when it arrived, or "base".
"""

from __future__ import annotations

import asyncio
import base64
import struct
import time
import uuid
from datetime import datetime

from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from service.base_model import LoadedBase
from service.deps import BaseDep, EngineDep, StoreDep
from service.engine import CompletionChunk, CompletionResult
from service.engine import CompletionRequest as EngineCompletion
from service.errors import BadRequest, Unprocessable
from service.routes import error_responses, inference_router
from service.routes.sse import data, stream_response, usage_event
from service.schemas import (
    Classification,
    ClassifyRequest,
    ClassifyResponse,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Embedding,
    EmbeddingInfo,
    EmbeddingRequest,
    EmbeddingResponse,
    LabelScore,
    ModelCard,
    ModelList,
    Usage,
)

__all__ = ["router"]

router = inference_router()


def _texts(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else value


@router.post("/completions", response_model=CompletionResponse, summary="Complete a prompt (OpenAI-compatible)",
             responses={200: {"content": {"text/event-stream": {}},
                              "description": "JSON, or with stream=true, server-sent events"}})
async def completions(body: CompletionRequest, engine: EngineDep) -> CompletionResponse | StreamingResponse:
    meta = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": body.model}
    ref = await engine.resolve(body.model)  # once: every prompt of this call runs on the same version
    requests = [EngineCompletion(model=body.model, prompt=p, max_tokens=body.max_tokens, temperature=body.temperature,
                                 top_p=body.top_p, seed=body.seed, stop=body.stops(),
                                 logprobs=body.logprobs, stream=body.stream, origin=meta["id"], ref=ref)
                for p in _texts(body.prompt)]
    if body.stream:
        if len(requests) != 1:
            raise BadRequest("stream=true takes a single prompt", key="prompt")
        return await stream_response(engine, requests[0], lambda chunk: _event(chunk, meta, body.include_usage()))
    results: list[CompletionResult] = await asyncio.gather(*(engine.complete(r) for r in requests))
    choices = [_choice(i, r) for i, r in enumerate(results)]
    usage = Usage.of(sum(r.prompt_tokens for r in results), sum(r.completion_tokens for r in results))
    return CompletionResponse(**meta, choices=choices, usage=usage, system_fingerprint=results[0].system_fingerprint)


def _choice(index: int, result: CompletionResult) -> CompletionChoice:
    c = result.choice
    logprobs = None
    if c.token_logprobs is not None:
        logprobs = CompletionLogprobs(tokens=c.tokens, token_logprobs=c.token_logprobs, text_offset=c.text_offsets,
                                      top_logprobs=c.top_logprobs)
    return CompletionChoice(text=c.text, index=index, logprobs=logprobs, finish_reason=c.finish_reason)


def _event(chunk: CompletionChunk, meta: dict, include_usage: bool) -> str:
    """One `text_completion` event; with stream_options.include_usage, the counts after the last one."""
    logprobs = None
    if chunk.token_logprobs is not None:
        logprobs = {"tokens": chunk.tokens, "token_logprobs": chunk.token_logprobs,
                    "top_logprobs": chunk.top_logprobs, "text_offset": chunk.text_offsets}
    choice = {"text": chunk.text, "index": 0, "logprobs": logprobs, "finish_reason": chunk.finish_reason}
    meta = {**meta, "system_fingerprint": chunk.system_fingerprint}
    return data({**meta, "choices": [choice]}) + (usage_event(meta, chunk) if include_usage else "")


@router.post("/embeddings", response_model=EmbeddingResponse, summary="Embed texts (OpenAI-compatible)")
async def embeddings(body: EmbeddingRequest, engine: EngineDep, base: BaseDep) -> EmbeddingResponse:
    width = base.embedding.dimensions if base.embedding is not None else getattr(base.model.config, "hidden_size", None)
    if body.dimensions is not None and body.dimensions != width:
        raise Unprocessable(f"dimensions={body.dimensions} is not supported: this model's embeddings have {width} "
                            "dimensions, and they are not truncated", key="dimensions")
    result = await engine.embed(body.model, _texts(body.input), prompt=body.prompt, prompt_name=body.prompt_name)
    data = [Embedding(index=i, embedding=_encode(e, body.encoding_format)) for i, e in enumerate(result.embeddings)]
    usage = Usage.of(result.prompt_tokens)
    return EmbeddingResponse(data=data, model=body.model, usage=usage, system_fingerprint=result.system_fingerprint)


def _encode(vector: list[float], encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":  # what the openai client asks for by default
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


@router.post("/classify", response_model=ClassifyResponse, summary="Classify texts")
async def classify(body: ClassifyRequest, engine: EngineDep) -> ClassifyResponse:
    result = await engine.classify(body.model, _texts(body.input))
    data = [Classification(index=i, label=ranked[0]["label"], score=ranked[0]["score"],
                           scores=[LabelScore(**s) for s in ranked]) for i, ranked in enumerate(result.results)]
    usage = Usage.of(result.prompt_tokens)
    return ClassifyResponse(data=data, model=body.model, usage=usage, system_fingerprint=result.system_fingerprint)


@router.get("/models", response_model=ModelList, summary="The base model and every adapter (OpenAI-style)")
async def models(store: StoreDep, base: BaseDep) -> ModelList:
    cards = [_card(base, "base", 0, None)]
    after = None
    while True:
        records, has_more = await run_in_threadpool(store.list, 1000, after)
        cards += [_card(base, r.name, _epoch(r.created_at), "base") for r in records]
        if not has_more:
            return ModelList(data=cards)
        after = records[-1].name


@router.get("/models/{model_id}", response_model=ModelCard, summary="The base model or one adapter (OpenAI-style)",
            responses=error_responses(404))
async def model(model_id: str, store: StoreDep, base: BaseDep) -> ModelCard:
    if model_id == "base":
        return _card(base, "base", 0, None)
    record = await run_in_threadpool(store.get, model_id)  # UnknownAdapterError -> 404
    return _card(base, record.name, _epoch(record.created_at), "base")


def _card(base: LoadedBase, model_id: str, created: int, parent: str | None) -> ModelCard:
    """An adapter embeds as its base does, so both cards carry the base's embedding spec."""
    embedding = EmbeddingInfo(**base.embedding.as_dict()) if base.embedding is not None else None
    return ModelCard(id=model_id, created=created, root=base.model_id, parent=parent, embedding=embedding)


def _epoch(iso: str) -> int:
    return int(datetime.fromisoformat(iso).timestamp())
