"""Tokenization in handler threads, on a small pool of copies of the base tokenizer.

A fast tokenizer's truncation setting is state on its Rust object: each call with `truncation=True` switches
it on and each call without switches it off, so on one tokenizer shared by threads a prompt can switch off
the truncation an embedding call has just switched on, and that call silently comes back longer than the
context (measured with tokenizers 0.23: about 1 call in 170 under contention). One lock around one tokenizer
prevented that but made every request wait for the longest text anyone was tokenizing (a 4 MB prompt:
seconds). Instead each call borrows a copy of its own for its duration, so as many texts as the pool holds
copies are tokenized at once (the Rust code runs without the GIL). The loop thread keeps the original for
decoding and padding; no handler touches it.
"""

from __future__ import annotations

import contextlib
import copy
import os
import queue
from collections.abc import Iterator
from typing import Any

from jinja2 import TemplateSyntaxError

from service.base_model import LoadedBase
from service.engine.errors import BadRequestError, EngineError

__all__ = ["TokenizerPool", "default_pool_size", "encode", "render_chat"]


def default_pool_size() -> int:
    """One tokenizer per core, 2 to 4: more copies than cores would only hold memory."""
    return max(2, min(4, os.cpu_count() or 1))


class TokenizerPool:
    def __init__(self, tokenizer: Any, size: int) -> None:
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(size):
            self._free.put(copy.deepcopy(tokenizer))

    @contextlib.contextmanager
    def borrow(self) -> Iterator[Any]:
        """A tokenizer no other thread uses until the block ends (waits while every copy is out)."""
        tokenizer = self._free.get()
        try:
            yield tokenizer
        finally:
            self._free.put(tokenizer)


def encode(base: LoadedBase, tokenizer: Any, texts: list[str], *, truncate: bool) -> list[list[int]]:
    """Token ids per text (cut to the longest input the model takes when `truncate`: an embedding base's own
    max_seq_length, else its context), with a tokenizer borrowed from the pool; called from worker threads
    before queueing, so a long text never holds up the loop thread."""
    limit = base.embedding.max_length if base.embedding is not None else base.max_length
    kwargs = {"truncation": True, "max_length": limit} if truncate else {}
    return tokenizer(texts, **kwargs)["input_ids"]


def render_chat(base: LoadedBase, tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a chat, rendered by the tokenizer's own chat template with the assistant's turn opened
    (tokenized by the template itself, so special tokens it writes are not added twice). The template is read
    from the base's tokenizer (a Python attribute, safe to read from any thread), so the copies never carry a
    stale one."""
    template = getattr(base.tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates (chat_template.jinja + additional_chat_templates/)
        template = template.get("default")  # what transformers picks for a chat without tools
    if not template:
        raise BadRequestError(f"the base model {base.model_id!r} has no chat template (tokenizer_config.json "
                              "`chat_template`): use /v1/completions with the prompt format it was trained on")
    try:
        ids = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True,
                                            add_generation_prompt=True)
    except TemplateSyntaxError as exc:  # the model's files are broken, not the request
        raise EngineError(f"the base model's chat template does not compile ({exc}); fix its chat_template "
                          "or use /v1/completions") from exc
    except Exception as exc:  # noqa: BLE001 - a template may refuse a conversation (roles out of order...)
        raise BadRequestError(f"the chat template refused these messages: {exc}") from exc
    if not isinstance(ids, list):  # transformers 5 answers a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)
