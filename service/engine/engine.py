"""The engine: one loop thread owns the model; HTTP handlers hand it work through a queue.

    handler ──tokenize, load the adapter into the host cache (worker threads)──► queue ──► loop thread (loop.py)

This is the event-loop side: the public API the routes call (embed, classify, complete, stream, merge,
unmerge, state, forget), the lifecycle, and validation. Every weight change (merge, unmerge, switch,
adapter in/out) and every forward runs on the loop thread while holding `self.lock`, so a forward never
sees half-merged weights; calls that change weights are queued to it as controls. The one other holder of
the lock is the fingerprint hash (`state(fingerprints=True)`), which reads every base weight in a worker
thread, so the loop thread waits for it only between batches, and merges never pay for it. Reading an adapter
from disk, validating it and tokenizing happen off the loop (in `asyncio.to_thread`), so a cold adapter
or a long text does not stall batches of warm ones. Generation is continuously batched (decoding.py).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from adapters import LoraModel, LoraWeights, validate_adapter
from adapters.merge_kernel import kernel_name
from adapters.validation import model_index
from service.base_model import LoadedBase
from service.embedding_spec import EmbeddingSpecError
from service.engine.budget import RowQueue
from service.engine.decoding import Decoder
from service.engine.errors import AdapterChangedError, BadRequestError, EngineBusyError, WrongTaskError
from service.engine.fingerprint import fingerprint
from service.engine.generation import check_prompt
from service.engine.loop import STOP, LoopThread
from service.engine.policy import MergePolicy
from service.engine.requests import (
    ClassifyResult,
    CompletionChunk,
    CompletionRequest,
    CompletionResult,
    EmbedResult,
    WorkItem,
)
from service.engine.tiers import AdapterTiers
from service.engine.tokenizing import TokenizerPool, default_pool_size, encode, render_chat

__all__ = ["Engine"]

# The largest |s·B·A| entry an uploaded adapter may add to a weight. Trained deltas are small next to the
# weights (well under 1); one of 10^4 can only overflow activations, or wreck the model, so it is refused.
MAX_DELTA = 1e4
log = logging.getLogger(__name__)


class Engine(LoopThread):
    def __init__(self, base: LoadedBase, settings: Any, store: Any, metrics: Any = None) -> None:
        self.base, self.settings, self.store, self.metrics = base, settings, store, metrics
        self.index = model_index(base.model)  # the bare base's tree, for validation in any thread
        self.lm = LoraModel(base.model, max_rank=settings.max_rank, fused_merges=settings.merge_kernel == "auto")
        self.lock = threading.RLock()
        self.tiers = AdapterTiers(self.lm, base, settings, store, self.validate, self._count)
        self.host_cache, self.resident = self.tiers.host, self.tiers.resident  # read by state() and the tests
        self.policy = MergePolicy(settings.merge_policy, window=getattr(settings, "merge_window", 64),
                                  min_dwell=getattr(settings, "merge_min_dwell", 8))
        self.pinned = False
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._loads: dict[str, asyncio.Future] = {}
        self.tokenizers = TokenizerPool(base.tokenizer, default_pool_size())  # for handler threads only
        self.decoder = Decoder(self.lm, base) if base.task == "generate" else None
        self._waiting: list[WorkItem] = []  # generation requests that cannot join the running decode
        self._pristine_fingerprint: str | None = None  # of W0, which never changes: hashed on the first request
        self._rows = RowQueue(key=self._forward_key)  # embed/classify rows waiting for a forward (budget.py)
        self.ready = False

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="lora-engine", daemon=True)
        self._thread.start()
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        if self._thread is not None:
            self._queue.put(STOP)
            await asyncio.to_thread(self._thread.join, 30)
        # Whatever was queued behind the stop is answered, not left hanging: 503 for its handler.
        if self._thread is None or not self._thread.is_alive():  # else the loop still owns it (the join timed out)
            waiting, self._waiting = self._waiting, []
            for item in waiting:
                item.fail(EngineBusyError("the service is shutting down"))
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, WorkItem):
                item.fail(EngineBusyError("the service is shutting down"))

    # ------------------------------------------------------------------ adapters
    def validate(self, weights: LoraWeights) -> LoraWeights:
        """Against the bare base (a snapshot: the loop thread may be wrapping layers meanwhile). Conflicts
        with the adapters resident at the time are checked when one is added, on the loop thread."""
        return validate_adapter(self.base.model, weights, max_rank=self.settings.max_rank,
                                allow_detached=self.base.task != "classify", max_delta=MAX_DELTA, index=self.index)

    async def _ensure_loaded(self, name: str | None) -> tuple[str, LoraWeights] | None:
        """Read and validate `name` off the loop thread (concurrent callers share one load), so the loop
        never waits for the disk; None when it is resident already (or for the base)."""
        if name is None or name in self.resident:
            return None
        fut = self._loads.get(name)
        if fut is None:
            fut = asyncio.ensure_future(asyncio.to_thread(self.tiers.load, name))
            self._loads[name] = fut
            fut.add_done_callback(lambda _f, n=name: self._loads.pop(n, None))
        return await asyncio.shield(fut)

    def prefetch(self, name: str) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        task = loop.create_task(self._ensure_loaded(name))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # a failed prefetch is not an error

    def forget(self, name: str, *, replaced: bool = False) -> None:
        """After a delete, or an overwrite (`replaced`): drop every cached copy, unmerging first if it is
        merged. An overwritten adapter that was pinned merged is merged again in its new version, so the
        pin holds until an explicit unmerge. The loop runs this before any batch it gathers with it, so
        no later request sees the old weights."""
        self.host_cache.pop(name)

        def drop() -> None:
            if self.decoder is not None and name in self.decoder.adapters():
                self.decoder.fail(AdapterChangedError(name, replaced), adapter=name)  # never finish on stale weights
            self._rows.fail_started(name, AdapterChangedError(name, replaced))  # nor a half-embedded request
            # Under the lock as a whole: unwrapping layers changes the module tree that a fingerprint walks
            # from a worker thread, and the unmerge, the eviction and the re-pin are one change to readers.
            with self.lock:
                repin = replaced and self.pinned and self.lm.merged_adapter == name
                self.policy.forget(name)  # its past traffic must not make `auto` merge it (or its successor)
                self._evict(name, force=True)
                if repin:
                    try:
                        self._set_merged(name, kind="merge")
                        self.pinned = True
                    except Exception as exc:  # noqa: BLE001 - e.g. the new version cannot merge: served unmerged
                        log.warning("the new version of pinned adapter %r could not be merged (%s); unpinned",
                                    name, exc)

        self._call_soon(drop)

    def _evict(self, name: str, force: bool = False) -> None:
        """Loop thread: take `name` off the device; a merged adapter only when forced (after a delete)."""
        if name == self.lm.merged_adapter and name in self.resident:
            if not force:
                return
            self._set_merged(None, kind="unmerge")
            self.pinned = False
        self.tiers.remove(name)

    # ------------------------------------------------------------------ merge
    def _set_merged(self, name: str | None, kind: str, *, protect: frozenset[str] = frozenset(),
                    preloaded: tuple[str, LoraWeights] | None = None) -> None:
        """Loop thread: merge `name` (None: unmerge), keeping `protect` (the running batch's adapters) resident."""
        with self.lock:
            if name is None:
                self.lm.unmerge()
            else:
                self.tiers.add_resident(name, preloaded)
                self.tiers.trim(protect=protect | {name} | self._busy())
                self.lm.merge(name)
        if self.metrics is not None:
            self.metrics.merges.labels(kind=kind).inc()
            self.metrics.merge_mode.set(0 if name is None else 1)

    async def merge(self, name: str) -> dict:
        """Merge `name` and pin it; answers the state read right after, on the loop thread, without
        fingerprints: a switch over HTTP costs the switch, not two hashes of every base weight."""
        preloaded = await self._ensure_loaded(name)

        def do() -> dict:
            kind = "switch" if self.lm.merged_adapter not in (None, name) else "merge"
            with self.lock:  # the pin changes with the weights: a state read under the lock sees both or neither
                self._set_merged(name, kind, preloaded=preloaded)
                self.pinned = True
            return self._snapshot()

        return await self._call(do)

    async def unmerge(self) -> dict:
        def do() -> dict:
            with self.lock:
                self._set_merged(None, "unmerge")
                self.pinned = False
            return self._snapshot()

        return await self._call(do)

    async def state(self, fingerprints: bool = True) -> dict:
        """The merge state. With `fingerprints`, sha256 of the base weights as they are now and of the pristine
        ones (hashed once, then cached: W0 never changes), computed in a worker thread; without, both are None."""
        if not fingerprints:
            return await self._call(self._snapshot)
        # A trip through the queue first, so that every control queued before this call (the forget that a
        # DELETE or an overwrite queued) has run: the answer then reflects it, as the plain state does.
        await self._call(lambda: None)
        return await asyncio.to_thread(self._fingerprinted_state)

    def _snapshot(self) -> dict:
        with self.lock:
            return {
                "merged_adapter": self.lm.merged_adapter,
                "pinned": self.pinned,
                "mode": "merged" if self.lm.merged_adapter else "unmerged",
                "merge_policy": self.policy.describe(),
                "resident_adapters": list(self.resident),
                "host_cached_adapters": self.host_cache.names(),
                "host_cache_bytes": self.host_cache.nbytes,
                "pristine_bytes": self.lm.pristine_nbytes(),
                "merge_kernel": kernel_name(self.base.device, self.base.dtype, fused=self.lm.fused_merges),
                "fingerprint": None,
                "pristine_fingerprint": None,
            }

    def _fingerprinted_state(self) -> dict:
        """Worker thread, never the loop thread: the lock is held just for the state and the hashes, so the
        weights cannot change mid-hash and the state matches them; batches wait for the hash, and a merge
        or unmerge waits only when it arrives during one."""
        with self.lock:
            state = self._snapshot()
            if self._pristine_fingerprint is None:  # under the lock: concurrent first requests hash it once
                self._pristine_fingerprint = fingerprint(self.lm, pristine=True)
            state.update(fingerprint=fingerprint(self.lm), pristine_fingerprint=self._pristine_fingerprint)
        return state

    # ------------------------------------------------------------------ inference API
    def _check_task(self, kind: str) -> None:
        allowed = {"generate": {"generate"}, "classify": {"classify"}, "embed": {"embed", "classify"}}[self.base.task]
        if kind not in allowed:
            raise WrongTaskError(f"the base model {self.base.model_id!r} serves {self.base.task} requests; "
                                 f"it cannot serve {kind} requests")

    async def _submit(self, kind: str, model: str, payload: Any, stream: asyncio.Queue | None = None) -> asyncio.Future:
        if not self.ready:
            raise EngineBusyError("the engine is not ready")
        self._check_task(kind)
        encoded = await asyncio.to_thread(self._encode, kind, payload)  # a long text never stalls the loop
        adapter = None if model == "base" else model
        preloaded = await self._ensure_loaded(adapter)
        if not self.ready:  # stopped while the adapter loaded: nothing would answer a queued item
            raise EngineBusyError("the service is shutting down")
        loop = asyncio.get_running_loop()
        item = WorkItem(kind, adapter, payload, loop.create_future(), loop, stream, preloaded=preloaded,
                        encoded=encoded)
        self._queue.put(item)
        return item.future

    def _encode(self, kind: str, payload: Any) -> list[list[int]]:
        """Worker thread: token ids of the texts, or of the prompt (checked against the context)."""
        with self.tokenizers.borrow() as tokenizer:  # its own copy: concurrent handlers tokenize in parallel
            if kind != "generate":
                return encode(self.base, tokenizer, payload, truncate=True)
            if payload.messages is not None:
                ids = render_chat(self.base, tokenizer, payload.messages)
            else:
                (ids,) = encode(self.base, tokenizer, [payload.prompt], truncate=False)
        check_prompt(self.base, payload, len(ids))
        return [ids]

    async def embed(self, model: str, texts: list[str], *, prompt: str | None = None,
                    prompt_name: str | None = None) -> EmbedResult:
        """With the base's default prompt prepended (or `prompt`, or its prompt named `prompt_name`), as
        SentenceTransformer.encode does."""
        if not texts:
            raise BadRequestError("input must hold at least one text")
        if self.base.embedding is not None:
            try:
                prefix = self.base.embedding.resolve_prompt(prompt, prompt_name)
            except EmbeddingSpecError as exc:
                raise BadRequestError(str(exc)) from exc
            texts = [prefix + t for t in texts] if prefix else texts
        return await (await self._submit("embed", model, texts))

    async def classify(self, model: str, texts: list[str]) -> ClassifyResult:
        if not texts:
            raise BadRequestError("input must hold at least one text")
        return await (await self._submit("classify", model, texts))

    async def complete(self, request: CompletionRequest) -> CompletionResult:
        return await (await self._submit("generate", request.model, request))

    async def stream(self, request: CompletionRequest) -> AsyncIterator[CompletionChunk]:
        chunks: asyncio.Queue = asyncio.Queue()
        future = await self._submit("generate", request.model, request, chunks)
        try:
            while (chunk := await chunks.get()) is not None:
                yield chunk
            await future  # re-raises a failure of the batch
        finally:
            future.cancel()  # no-op when done; otherwise the consumer left, and decoding of its row stops

    # ------------------------------------------------------------------ the loop thread
    def _call_soon(self, fn: Callable[[], Any]) -> None:
        self._queue.put(fn)

    async def _call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the loop thread, between batches, and await its result."""
        if not self.ready:  # before start or after stop, nothing would run it
            raise EngineBusyError("the engine is not running")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        item = WorkItem("control", None, fn, fut, loop)
        self._queue.put(item)
        return await fut

    def _count(self, metric: str, tier: str) -> None:
        if self.metrics is not None:
            getattr(self.metrics, metric).labels(tier=tier).inc()
