"""`Engine`: the async facade the routes call. It resolves, tokenizes and loads off the loop, then hands work on.

    handler ─► Engine (event loop)          resolve `model` to an AdapterRef (store, worker thread), tokenize and
                 │                           load the adapter into the host cache (worker threads)
                 ├─ put(WorkItem) ─────────► Scheduler (scheduler.py): the loop thread, batching and decoding
                 └─ call(control) ─────────►   └─► WeightOwner (weights.py): LoraModel, residency tiers, merge
                                                    policy, the pin, the lock: the only writer of weights

A request's adapter is resolved once, at submit, to its (name, version, sha256) (identity.py): it runs with
exactly that sha256's weights, whatever the name points at by the time it runs (an overwrite meanwhile is a
new key, so a queued request is served whole by the version it resolved, or gets 409 if that version's files
are gone before it could load them; never a mix). The answer says which version in `system_fingerprint`.
`forget()` after a delete or overwrite frees memory sooner, fails requests that have started on that name
(409) and moves a pinned merge to the new version; correctness does not rest on it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from adapters import LoraWeights, UnknownAdapterError
from service.base_model import LoadedBase
from service.embedding_spec import EmbeddingSpecError
from service.engine.config import EngineConfig
from service.engine.errors import BadRequestError, EngineBusyError, WrongTaskError
from service.engine.generation import check_prompt
from service.engine.identity import AdapterRef, system_fingerprint
from service.engine.requests import (
    ClassifyResult,
    CompletionChunk,
    CompletionRequest,
    CompletionResult,
    EmbedResult,
    WorkItem,
)
from service.engine.scheduler import Scheduler
from service.engine.tokenizing import TokenizerPool, default_pool_size, encode, render_chat
from service.engine.weights import WeightOwner
from service.storage.interfaces import StorageUnavailableError

__all__ = ["Engine"]

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, base: LoadedBase, config: EngineConfig | Any, store: Any, metrics: Any = None) -> None:
        """`config`: an EngineConfig, or the service's Settings (read once by EngineConfig.from_settings)."""
        self.config = config if isinstance(config, EngineConfig) else EngineConfig.from_settings(config)
        self.base, self.store, self.metrics = base, store, metrics
        self.weights = WeightOwner(base, self.config, store, metrics)
        self.scheduler = Scheduler(base, self.config, self.weights, metrics)
        self.tokenizers = TokenizerPool(base.tokenizer, default_pool_size())  # for handler threads only
        self._loads: dict[str, asyncio.Future] = {}  # sha256 -> the load in flight, shared by its callers
        self._last_resolved: dict[str, AdapterRef] = {}  # name -> its latest ref: served while the index is down
        self._changes: set[asyncio.Task] = set()  # re-pins after an overwrite, awaited by state/merge/unmerge
        self.ready = False

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self.scheduler.start()
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        await self.scheduler.stop()

    # ------------------------------------------------------------------ adapters
    def validate(self, weights: LoraWeights) -> LoraWeights:
        """Full validation against the base (max_rank from the config); any thread."""
        return self.weights.validate(weights)

    async def resolve(self, model: str) -> AdapterRef | None:
        """What `model` names now (None for the base): one store lookup, in a worker thread.

        When the index cannot be reached (a shared store's PostgreSQL is down), the version this engine last
        resolved for the name is served if a copy of it is held (on the device or in host RAM), rather than
        failing the request; it is stale only if another server replaced or deleted the adapter meanwhile, and
        the next request after the index is back resolves it again. Anything not held answers 503."""
        if model == "base":
            return None
        try:
            record = await asyncio.to_thread(self.store.resolve, model)
        except StorageUnavailableError:
            last = self._last_resolved.get(model)
            where = self.weights.held(last) if last is not None else None
            if where is None:
                raise
            if self.metrics is not None:
                self.metrics.stale_served.labels(tier=where).inc()
            return last
        except LookupError as exc:  # a store without the domain error (tests' dict stores)
            raise UnknownAdapterError(f"adapter {model!r} not found", key=model) from exc
        ref = AdapterRef.of(record)
        self._last_resolved[model] = ref
        return ref

    async def _ensure_loaded(self, ref: AdapterRef | None) -> LoraWeights | None:
        """Read and validate `ref` off the loop thread (concurrent callers share one load), so the loop never
        waits for the store; None when it is resident already (or for the base)."""
        if ref is None or self.weights.is_resident(ref):
            return None
        fut = self._loads.get(ref.key)
        if fut is None:
            fut = asyncio.ensure_future(asyncio.to_thread(self.weights.load, ref))
            self._loads[ref.key] = fut
            fut.add_done_callback(lambda _f, k=ref.key: self._loads.pop(k, None))
        return await asyncio.shield(fut)

    def prefetch(self, name: str) -> None:
        """A hint after an upload: resolve and load into the host cache in the background."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return

        async def load() -> None:
            await self._ensure_loaded(await self.resolve(name))

        task = loop.create_task(load())
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # a failed prefetch is not an error

    def forget(self, name: str, *, replaced: bool = False) -> None:
        """After a delete, or an overwrite (`replaced`): requests already running on `name` fail (409), every
        cached version leaves memory, a merged one is unmerged, and one pinned merged is moved to the new
        version (resolved and loaded off the loop), so the pin holds until an explicit unmerge. An optimisation:
        requests are keyed by content, so without it nobody is served stale weights, only memory is kept longer."""
        self.weights.host.pop(name)
        weights, scheduler = self.weights, self.scheduler

        def drop() -> bool:
            scheduler.fail_adapter(name, replaced)
            merged = weights.merged
            repin = replaced and weights.pinned and merged is not None and merged.name == name
            weights.evict(name, keep_merged=repin)
            return repin

        if not replaced:
            scheduler.call_soon(drop)
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop (a script): the drop alone, unmerging
            loop = None
        if loop is None or not self.ready:
            scheduler.call_soon(lambda: (scheduler.fail_adapter(name, replaced), weights.evict(name)))
            return
        dropped = scheduler.control(drop)  # queued now: ahead of anything queued after this call
        task = loop.create_task(self._repin(name, dropped))
        self._changes.add(task)
        task.add_done_callback(lambda t: self._changes.discard(t) or t.cancelled() or t.exception())

    async def _repin(self, name: str, dropped: asyncio.Future) -> None:
        if not await dropped or not self.ready:  # nothing was pinned to `name`
            return
        try:
            ref = await self.resolve(name)
            preloaded = await self._ensure_loaded(ref)
        except Exception as exc:  # noqa: BLE001 - gone or unreadable: the old version is unmerged
            log.warning("the new version of pinned adapter %r could not be loaded (%s); unmerged", name, exc)
            ref, preloaded = None, None
        if self.ready:
            await self.scheduler.call(lambda: self.weights.repin(name, ref, preloaded, self.scheduler.busy()))

    async def _settled(self) -> None:
        """Wait for re-pins queued by forget() before this call, so state and merges see their effect."""
        if self._changes and self.ready:
            await asyncio.gather(*list(self._changes), return_exceptions=True)

    # ------------------------------------------------------------------ merge
    async def merge(self, name: str) -> dict:
        """Merge `name` (the version it names now) and pin it; answers the state read right after, on the loop
        thread, without fingerprints: a switch over HTTP costs the switch, not two hashes of every base weight."""
        await self._settled()
        self._check_running()
        ref = await self.resolve(name)
        preloaded = await self._ensure_loaded(ref)
        return await self._call(lambda: self.weights.merge(ref, preloaded, self.scheduler.busy()))

    async def unmerge(self) -> dict:
        await self._settled()
        return await self._call(self.weights.unmerge)

    async def state(self, fingerprints: bool = True) -> dict:
        """The merge state. With `fingerprints`, sha256 of the base weights as they are now and of the pristine
        ones (hashed once, then cached: W0 never changes), computed in a worker thread; without, both are None."""
        await self._settled()
        if not fingerprints:
            return await self._call(self.weights.snapshot)
        # A trip through the queue first, so that every control queued before this call (the forget that a
        # DELETE or an overwrite queued) has run: the answer then reflects it, as the plain state does.
        await self._call(lambda: None)
        return await asyncio.to_thread(self.weights.fingerprinted_state)

    async def _call(self, fn: Any) -> Any:
        self._check_running()
        return await self.scheduler.call(fn)

    def _check_running(self) -> None:
        if not self.ready:  # before start or after stop, nothing would run it
            raise EngineBusyError("the engine is not running")

    # ------------------------------------------------------------------ inference API
    def _check_task(self, kind: str) -> None:
        allowed = {"generate": {"generate"}, "classify": {"classify"}, "embed": {"embed", "classify"}}[self.base.task]
        if kind not in allowed:
            raise WrongTaskError(f"the base model {self.base.model_id!r} serves {self.base.task} requests; "
                                 f"it cannot serve {kind} requests")

    async def _submit(self, kind: str, model: str, payload: Any, stream: asyncio.Queue | None = None
                      ) -> tuple[asyncio.Future, str]:
        """Queue one request; (its future, the system_fingerprint of the version it resolved)."""
        if not self.ready:
            raise EngineBusyError("the engine is not ready")
        self._check_task(kind)
        encoded = await asyncio.to_thread(self._encode, kind, payload)  # a long text never stalls the loop
        ref = getattr(payload, "ref", None) or await self.resolve(model)  # once: it runs with exactly this version
        preloaded = await self._ensure_loaded(ref)
        if not self.ready:  # stopped while the adapter loaded: nothing would answer a queued item
            raise EngineBusyError("the service is shutting down")
        loop = asyncio.get_running_loop()
        item = WorkItem(kind, ref, payload, loop.create_future(), loop, stream, preloaded=preloaded, encoded=encoded)
        self.scheduler.put(item)
        return item.future, system_fingerprint(ref)

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

    async def _answer(self, kind: str, model: str, payload: Any) -> Any:
        future, fingerprint = await self._submit(kind, model, payload)
        result = await future
        result.system_fingerprint = fingerprint
        return result

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
        return await self._answer("embed", model, texts)

    async def classify(self, model: str, texts: list[str]) -> ClassifyResult:
        if not texts:
            raise BadRequestError("input must hold at least one text")
        return await self._answer("classify", model, texts)

    async def complete(self, request: CompletionRequest) -> CompletionResult:
        return await self._answer("generate", request.model, request)

    async def stream(self, request: CompletionRequest) -> AsyncIterator[CompletionChunk]:
        chunks: asyncio.Queue = asyncio.Queue()
        future, fingerprint = await self._submit("generate", request.model, request, chunks)
        try:
            while (chunk := await chunks.get()) is not None:
                chunk.system_fingerprint = fingerprint
                yield chunk
            await future  # re-raises a failure of the batch
        finally:
            future.cancel()  # no-op when done; otherwise the consumer left, and decoding of its row stops
