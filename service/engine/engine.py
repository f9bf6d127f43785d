"""The engine: one loop thread owns the model; HTTP handlers hand it work through a queue.

    handler ──await load into host cache (thread pool)──► queue ──► loop thread
                                                                  ├─ gather ≤ max_batch_size items / ≤ max_wait_ms
                                                                  ├─ merge policy (hysteresis) under the lock
                                                                  ├─ make the batch's adapters resident (LRU)
                                                                  ├─ one forward for all rows, any adapter mix
                                                                  └─ generation: newcomers join the running
                                                                     decode; one decoding step per turn

Every weight change (merge, unmerge, switch, adapter in/out) and every forward runs on the loop thread
while holding `self.lock`, so a forward never sees half-merged weights. While a decode runs, the loop
takes what has queued without waiting, runs it, then one decoding step (continuous batching: see
decoding.py); a merge between two steps leaves every row exact, and the adapters of running rows stay
resident until those rows end. Reading an adapter from disk
and validating it happens off the loop (in `asyncio.to_thread`), so a cold adapter does not stall
batches of warm ones.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from adapters import LoraModel, LoraWeights, MergeError, validate_adapter
from adapters.validation import model_index
from service.base_model import LoadedBase
from service.engine.batch import admissible, run_batch
from service.engine.decoding import Decoder
from service.engine.errors import AdapterChangedError, BadRequestError, EngineBusyError, WrongTaskError
from service.engine.fingerprint import fingerprint
from service.engine.generation import check_prompt
from service.engine.policy import MergePolicy
from service.engine.requests import (
    ClassifyResult,
    CompletionChunk,
    CompletionRequest,
    CompletionResult,
    EmbedResult,
    WorkItem,
)
from service.engine.runner import encode
from service.engine.tiers import AdapterTiers

__all__ = ["Engine"]

_STOP = object()
# The largest |s·B·A| entry an uploaded adapter may add to a weight. Trained deltas are small next to the
# weights (well under 1); one of 10^4 can only overflow activations, or wreck the model, so it is refused.
MAX_DELTA = 1e4
log = logging.getLogger(__name__)


class Engine:
    def __init__(self, base: LoadedBase, settings: Any, store: Any, metrics: Any = None) -> None:
        self.base, self.settings, self.store, self.metrics = base, settings, store, metrics
        self.index = model_index(base.model)  # the bare base's tree, for validation in any thread
        self.lm = LoraModel(base.model, max_rank=settings.max_rank)
        self.lock = threading.RLock()
        self.tiers = AdapterTiers(self.lm, base, settings, store, self.validate, self._count)
        self.host_cache, self.resident = self.tiers.host, self.tiers.resident  # read by state() and the tests
        self.policy = MergePolicy(settings.merge_policy, window=getattr(settings, "merge_window", 64),
                                  min_dwell=getattr(settings, "merge_min_dwell", 8))
        self.pinned = False
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._loads: dict[str, asyncio.Future] = {}
        self._tokenizer_lock = threading.Lock()
        self.decoder = Decoder(self.lm, base) if base.task == "generate" else None
        self._waiting: list[WorkItem] = []  # generation requests that cannot join the running decode
        self.ready = False

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="lora-engine", daemon=True)
        self._thread.start()
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        if self._thread is not None:
            self._queue.put(_STOP)
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
            repin = replaced and self.pinned and self.lm.merged_adapter == name
            self.policy.forget(name)  # its past traffic must not make `auto` merge it (or its successor)
            self._evict(name, force=True)
            if repin:
                try:
                    self._set_merged(name, kind="merge")
                    self.pinned = True
                except Exception as exc:  # noqa: BLE001 - e.g. the new version cannot merge: served unmerged
                    log.warning("the new version of pinned adapter %r could not be merged (%s); unpinned", name, exc)

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
        preloaded = await self._ensure_loaded(name)

        def do() -> None:
            kind = "switch" if self.lm.merged_adapter not in (None, name) else "merge"
            self._set_merged(name, kind, preloaded=preloaded)
            self.pinned = True

        await self._call(do)
        return await self.state()

    async def unmerge(self) -> dict:
        def do() -> None:
            self._set_merged(None, "unmerge")
            self.pinned = False

        await self._call(do)
        return await self.state()

    async def state(self, fingerprints: bool = True) -> dict:
        def do() -> dict:
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
                    "fingerprint": fingerprint(self.base.model, pristine=False) if fingerprints else None,
                    "pristine_fingerprint": fingerprint(self.base.model, pristine=True) if fingerprints else None,
                }

        return await self._call(do)

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
        with self._tokenizer_lock:  # concurrent handlers: one call into the fast tokenizer at a time
            if kind != "generate":
                return encode(self.base, payload, truncate=True)
            (ids,) = encode(self.base, [payload.prompt], truncate=False)
        check_prompt(self.base, payload, len(ids))
        return [ids]

    async def embed(self, model: str, texts: list[str]) -> EmbedResult:
        if not texts:
            raise BadRequestError("input must hold at least one text")
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

    def _loop(self) -> None:
        stopping = False
        while True:
            decoding = self.decoder is not None and self.decoder.active
            if self._waiting and self._room() > 0:  # requests that waited for rows to end: first come, first in
                waiting, self._waiting = self._waiting, []
                self._run_group(waiting)
                continue
            if stopping and not decoding:
                return
            first = None
            if not stopping:
                try:  # while decoding, never wait: the running rows need their next step
                    first = self._queue.get_nowait() if decoding else self._queue.get()
                except queue.Empty:
                    pass
            if first is _STOP:
                stopping = True  # the running decode finishes; nothing new is taken
            elif first is not None:
                batch, controls = self._gather(first, wait=not decoding)
                # Controls first: an eviction after a DELETE or overwrite, or a merge, was asked for before (or
                # while) these requests queued, so they must see its effect, never the stale weights.
                for control in controls:
                    self._run_control(control)
                for group in self._groups(batch):
                    self._run_group(group)
            if self.decoder is not None and self.decoder.active:
                self._step()

    def _room(self) -> int:
        """How many more rows the running decode takes now: up to max_batch_size, and none mid-decode when
        this model's cache cannot take newcomers."""
        return self.settings.max_batch_size - self.decoder.running() if self.decoder.can_join() else 0

    def _busy(self) -> set[str]:
        """Adapters that running generation rows use: never evicted, whatever the bounds."""
        return self.decoder.adapters() if self.decoder is not None else set()

    def _gather(self, first: Any, wait: bool = True) -> tuple[list[WorkItem], list[Any]]:
        batch: list[WorkItem] = []
        controls: list[Any] = []
        (controls if _is_control(first) else batch).append(first)
        if not batch:
            return batch, controls
        deadline = time.perf_counter() + (self.settings.max_wait_ms / 1000 if wait else 0.0)
        while len(batch) < self.settings.max_batch_size:
            remaining = deadline - time.perf_counter()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                self._queue.put(_STOP)
                break
            (controls if _is_control(item) else batch).append(item)
        return batch, controls

    def _groups(self, batch: list[WorkItem]) -> list[list[WorkItem]]:
        by_kind: dict[str, list[WorkItem]] = {}
        for item in batch:
            by_kind.setdefault(item.kind, []).append(item)
        groups = list(by_kind.values())
        if self.policy.mode == "always":  # the merge-always baseline: one forward per adapter
            groups = [[i for i in g if i.adapter == a] for g in groups for a in dict.fromkeys(i.adapter for i in g)]
        return groups

    def _run_control(self, control: Any) -> None:
        fn = control.payload if isinstance(control, WorkItem) else control
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 - handed back to the awaiting handler
            if isinstance(control, WorkItem):
                control.fail(exc)
            return
        if isinstance(control, WorkItem):
            control.resolve(result)

    def _run_group(self, items: list[WorkItem]) -> None:
        generate = items[0].kind == "generate"
        if generate:  # the running decode takes what it has room for; the rest waits for rows to end
            room = max(self._room(), 0)
            items, overflow = items[:room], items[room:]
            self._waiting.extend(overflow)
            if not items:
                return
        started = time.perf_counter()
        with self.lock:
            try:
                items = admissible(self.lm, self.base, self._residents_for(items))
                if not items:
                    return
                self._apply_policy(items)
                if generate:
                    self._join(items)
                else:
                    run_batch(self.lm, self.base, items)
            finally:
                self.tiers.trim(protect=self._busy())  # a batch may overshoot the bounds; not beyond it
        if self.metrics is not None:
            self.metrics.batch_size.observe(len(items))
            if not generate:  # a decode's time is observed per step
                self.metrics.forward_seconds.observe(time.perf_counter() - started)

    def _join(self, items: list[WorkItem]) -> None:
        try:
            self.decoder.join(items)
        except Exception as exc:  # noqa: BLE001 - the newcomers' prefill failed: they fail, running rows go on
            for item in items:
                item.fail(exc)

    def _step(self) -> None:
        started = time.perf_counter()
        with self.lock:
            try:
                self.decoder.step()
            except Exception as exc:  # noqa: BLE001 - the rows share this forward, so all of them fail
                self.decoder.fail(exc)
            finally:
                self.tiers.trim(protect=self._busy())  # rows that ended no longer hold their adapters
        if self.metrics is not None:
            self.metrics.forward_seconds.observe(time.perf_counter() - started)

    def _residents_for(self, items: list[WorkItem]) -> list[WorkItem]:
        """Make every adapter of the batch resident at once (so loading one cannot evict another that the
        batch needs); a request whose adapter vanished (deleted meanwhile) fails alone, the rest runs."""
        failed: dict[str, Exception] = {}
        preloaded: dict[str, tuple[str, LoraWeights] | None] = {}
        for item in items:  # any batch-mate's copy will do (the tiers check it is the stored version)
            if item.adapter is not None and preloaded.get(item.adapter) is None:
                preloaded[item.adapter] = item.preloaded
        names = set(preloaded)
        for name in names:
            try:
                self.tiers.add_resident(name, preloaded[name])
            except Exception as exc:  # noqa: BLE001
                failed[name] = exc
        self.tiers.trim(protect=names | self._busy())
        for item in items:
            if item.adapter in failed:
                item.fail(failed[item.adapter])
        return [i for i in items if i.adapter not in failed]

    def _apply_policy(self, items: list[WorkItem]) -> None:
        """Merge or unmerge as the policy says. Advisory: a merge that fails leaves the batch to run
        unmerged (exact either way); only adapters the batch names or that are resident are merged."""
        adapters = [i.adapter for i in items]
        batch = frozenset(a for a in adapters if a is not None)
        if self.policy.mode == "always" and not self.pinned:
            target = adapters[0]
            change = self.lm.merged_adapter != target and target not in self.policy.refused
        else:
            self.policy.observe(adapters)
            change, target = self.policy.decide(self.lm.merged_adapter, self.pinned)
        if not change or (target is not None and target not in batch and target not in self.resident):
            return
        kind = "unmerge" if target is None else ("switch" if self.lm.merged_adapter else "merge")
        try:
            self._set_merged(target, kind, protect=batch)
        except Exception as exc:  # noqa: BLE001 - never fail the batch for the policy's sake
            if isinstance(exc, MergeError):  # tied or overflowing weights: it will never merge
                self.policy.refuse(target)
            log.warning("%s merge policy: not merging %r (%s); serving unmerged", self.policy.mode, target, exc)

    def _count(self, metric: str, tier: str) -> None:
        if self.metrics is not None:
            getattr(self.metrics, metric).labels(tier=tier).inc()


def _is_control(item: Any) -> bool:
    return callable(item) or (isinstance(item, WorkItem) and item.kind == "control")
