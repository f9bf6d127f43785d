"""What crosses from the HTTP handlers to the batching loop, and what comes back.

A handler builds a `WorkItem` and awaits its future; the loop thread fills it in. Handlers never touch
the model; the only tensors here are an adapter's, loaded and validated before the item is queued.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from service.engine.identity import BASE_FINGERPRINT, AdapterRef

__all__ = ["CompletionRequest", "CompletionChoice", "CompletionResult", "CompletionChunk", "EmbedResult",
           "ClassifyResult", "WorkItem"]


@dataclass
class CompletionRequest:
    model: str
    prompt: str
    max_tokens: int | None = 16  # None (chat): up to the model's context
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None: none; n: each token's logprob and the n most likely at its position
    stream: bool = False
    messages: list[dict[str, str]] | None = None  # chat: rendered by the tokenizer's chat template, not `prompt`
    origin: str | None = None  # the call it belongs to (one HTTP request may carry many prompts): fair turns
    ref: AdapterRef | None = None  # resolved already (engine.resolve): the prompts of one call share one version


@dataclass
class CompletionChoice:
    text: str
    finish_reason: str  # "stop" | "length"
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float] | None = None
    text_offsets: list[int] = field(default_factory=list)  # where each token's text starts in `text`
    top_logprobs: list[dict[str, float]] | None = None  # per token: the n most likely tokens' text -> logprob


@dataclass
class CompletionResult:
    choice: CompletionChoice
    prompt_tokens: int
    completion_tokens: int
    system_fingerprint: str = BASE_FINGERPRINT  # which weights answered (identity.system_fingerprint)


@dataclass
class CompletionChunk:
    text: str
    finish_reason: str | None = None
    tokens: list[str] = field(default_factory=list)  # the tokens generated since the previous chunk
    token_logprobs: list[float] | None = None  # theirs, when logprobs were asked for
    text_offsets: list[int] = field(default_factory=list)  # where each token starts in the completion
    top_logprobs: list[dict[str, float]] | None = None  # theirs, when logprobs were asked for
    usage: tuple[int, int] | None = None  # (prompt, completion) tokens, on the final chunk
    system_fingerprint: str = BASE_FINGERPRINT


@dataclass
class EmbedResult:
    embeddings: list[list[float]]
    prompt_tokens: int
    system_fingerprint: str = BASE_FINGERPRINT


@dataclass
class ClassifyResult:
    results: list[list[dict[str, Any]]]  # per input: [{"label", "score"}], best first
    prompt_tokens: int
    system_fingerprint: str = BASE_FINGERPRINT


@dataclass
class WorkItem:
    kind: str  # "embed" | "classify" | "generate"
    ref: AdapterRef | None  # the adapter version resolved at submit; None = the base
    payload: Any  # list[str] of texts, or a CompletionRequest
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    stream_queue: asyncio.Queue | None = None  # generation with stream=True
    enqueued_at: float = field(default_factory=time.perf_counter)
    # the adapter's validated weights (exactly ref.sha256's) as read off the loop thread, when it was not resident
    preloaded: Any = None
    encoded: list[list[int]] | None = None  # token ids of each text (or of the prompt), made off the loop thread

    @property
    def adapter(self) -> str | None:
        """The adapter's name, for messages and for engine.forget(name); None for the base."""
        return None if self.ref is None else self.ref.name

    @property
    def key(self) -> str | None:
        """The adapter's key in LoraModel and every cache (its sha256); None for the base."""
        return None if self.ref is None else self.ref.key

    @property
    def abandoned(self) -> bool:
        """The caller went away (a streaming client disconnected): its remaining work can be skipped."""
        return self.future.cancelled()

    def resolve(self, value: Any) -> None:
        self.loop.call_soon_threadsafe(_set_result, self.future, value)

    def fail(self, exc: BaseException) -> None:
        """The outcome is `exc`; a stream, if there is one, ends here too (its consumer then re-raises it)."""
        self.push(None)
        self.loop.call_soon_threadsafe(_set_exception, self.future, exc)

    def push(self, chunk: CompletionChunk | None) -> None:
        if self.stream_queue is not None:
            self.loop.call_soon_threadsafe(self.stream_queue.put_nowait, chunk)


def _set_result(fut: asyncio.Future, value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
