"""The engine: one loop thread owns the model; HTTP handlers hand it work through a queue.

    handler ──await load into host cache (thread pool)──► queue ──► loop thread
                                                                  ├─ gather ≤ max_batch_size items / ≤ max_wait_ms
                                                                  ├─ merge policy (hysteresis) under the lock
                                                                  ├─ make the batch's adapters resident (LRU)
                                                                  └─ one forward for all rows, any adapter mix

Every weight change (merge, unmerge, switch, adapter in/out) and every forward runs on the loop thread
while holding `self.lock`, so a forward never sees half-merged weights. Reading an adapter from disk
and validating it happens off the loop (in `asyncio.to_thread`), so a cold adapter does not stall
batches of warm ones.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from typing import Any

from adapters import LoraModel, LoraWeights, UnknownAdapterError, validate_adapter
from service.base_model import LoadedBase
from service.engine.cache import HostCache
from service.engine.errors import BadRequestError, EngineBusyError, WrongTaskError
from service.engine.fingerprint import fingerprint
from service.engine.generation import check_generation, generate_batch
from service.engine.policy import MergePolicy
from service.engine.requests import (
    ClassifyResult,
    CompletionChunk,
    CompletionRequest,
    CompletionResult,
    EmbedResult,
    WorkItem,
)
from service.engine.runner import check_classify, classify_rows, embed_rows

__all__ = ["Engine"]

_STOP = object()


class Engine:
    def __init__(self, base: LoadedBase, settings: Any, store: Any, metrics: Any = None) -> None:
        self.base, self.settings, self.store, self.metrics = base, settings, store, metrics
        self.lm = LoraModel(base.model, max_rank=settings.max_rank)
        self.lock = threading.RLock()
        self.host_cache = HostCache(settings.host_cache_bytes)
        self.policy = MergePolicy(settings.merge_policy, window=getattr(settings, "merge_window", 64),
                                  min_dwell=getattr(settings, "merge_min_dwell", 8))
        self.pinned = False
        self.resident: OrderedDict[str, tuple[str, int]] = OrderedDict()  # name -> (sha256, bytes), LRU order
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._loads: dict[str, asyncio.Future] = {}
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

    # ------------------------------------------------------------------ adapters
    def validate(self, weights: LoraWeights) -> LoraWeights:
        return validate_adapter(self.base.model, weights, max_rank=self.settings.max_rank,
                                allow_detached=self.base.task != "classify")

    def _load_from_store(self, name: str) -> tuple[str, LoraWeights]:
        try:
            record = self.store.get(name)
        except LookupError as exc:
            raise UnknownAdapterError(f"adapter {name!r} not found", key=name) from exc
        cached = self.host_cache.get(name, record.sha256)
        if cached is not None:
            self._count("cache_hits", "host")
            return record.sha256, cached
        self._count("cache_misses", "host")
        weights = self.validate(self.store.load_weights(name))
        weights = weights.to(dtype=self.base.dtype)
        self.host_cache.put(name, record.sha256, weights)
        self._count("adapter_loads", "disk")
        return record.sha256, weights

    async def _ensure_loaded(self, name: str | None) -> None:
        """Bring `name` into host RAM off the loop thread; concurrent callers share one load."""
        if name is None or name in self.resident:
            return
        fut = self._loads.get(name)
        if fut is None:
            fut = asyncio.ensure_future(asyncio.to_thread(self._load_from_store, name))
            self._loads[name] = fut
            fut.add_done_callback(lambda _f, n=name: self._loads.pop(n, None))
        await asyncio.shield(fut)

    def prefetch(self, name: str) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        task = loop.create_task(self._ensure_loaded(name))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # a failed prefetch is not an error

    def forget(self, name: str) -> None:
        """After delete or overwrite: drop every cached copy (unmerging first if it is merged)."""
        self.host_cache.pop(name)
        self._call_soon(lambda: self._evict(name, force=True))

    def _make_resident(self, names: set[str]) -> None:
        """Loop thread: put the batch's adapters on the device, evicting LRU ones beyond the bounds."""
        for name in names:
            sha, weights = self._load_from_store(name) if name not in self.resident else (None, None)
            if name in self.resident:
                self.resident.move_to_end(name)
                self._count("cache_hits", "device")
                continue
            self._count("cache_misses", "device")
            self.lm.add_adapter(name, weights.to(self.base.device), validate=False)
            self.resident[name] = (sha, weights.nbytes())
            self._count("adapter_loads", "device")
        max_n, max_bytes = self.settings.device_cache_adapters, self.settings.device_cache_bytes
        for victim in list(self.resident):
            if len(self.resident) <= max_n and sum(b for _, b in self.resident.values()) <= max_bytes:
                break
            if victim not in names and victim != self.lm.merged_adapter:
                self._evict(victim)

    def _evict(self, name: str, force: bool = False) -> None:
        if name not in self.resident:
            return
        if name == self.lm.merged_adapter:
            if not force:
                return
            self._set_merged(None, kind="unmerge")
            self.pinned = False
        self.lm.remove_adapter(name)
        del self.resident[name]

    # ------------------------------------------------------------------ merge
    def _set_merged(self, name: str | None, kind: str) -> None:
        with self.lock:
            if name is None:
                self.lm.unmerge()
            else:
                self._make_resident({name})
                self.lm.merge(name)
        if self.metrics is not None:
            self.metrics.merges.labels(kind=kind).inc()
            self.metrics.merge_mode.set(0 if name is None else 1)

    async def merge(self, name: str) -> dict:
        await self._ensure_loaded(name)

        def do() -> None:
            kind = "switch" if self.lm.merged_adapter not in (None, name) else "merge"
            self._set_merged(name, kind)
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
        adapter = None if model == "base" else model
        await self._ensure_loaded(adapter)
        loop = asyncio.get_running_loop()
        item = WorkItem(kind, adapter, payload, loop.create_future(), loop, stream)
        self._queue.put(item)
        return item.future

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
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        item = WorkItem("control", None, fn, fut, loop)
        self._queue.put(item)
        return await fut

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch, controls = self._gather(first)
            for group in self._groups(batch):
                self._run_group(group)
            for control in controls:
                self._run_control(control)

    def _gather(self, first: Any) -> tuple[list[WorkItem], list[Any]]:
        batch: list[WorkItem] = []
        controls: list[Any] = []
        (controls if _is_control(first) else batch).append(first)
        if not batch:
            return batch, controls
        deadline = time.perf_counter() + self.settings.max_wait_ms / 1000
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
        started = time.perf_counter()
        with self.lock:
            items = self._admissible(self._residents_for(items))
            if not items:
                return
            try:
                self._apply_policy(items)
                if items[0].kind == "generate":
                    generate_batch(self.lm, self.base, items)
                else:
                    self._run_texts(items)
            except Exception as exc:  # noqa: BLE001 - handed back to the awaiting handlers
                self._fail_or_isolate(items, exc)
        if self.metrics is not None:
            self.metrics.batch_size.observe(len(items))
            self.metrics.forward_seconds.observe(time.perf_counter() - started)

    def _residents_for(self, items: list[WorkItem]) -> list[WorkItem]:
        """Make each named adapter resident; a request whose adapter vanished (deleted meanwhile) fails
        alone, the rest of the batch runs."""
        failed: dict[str, Exception] = {}
        for name in dict.fromkeys(i.adapter for i in items if i.adapter is not None):
            try:
                self._make_resident({name})
            except Exception as exc:  # noqa: BLE001
                failed[name] = exc
        for item in items:
            if item.adapter in failed:
                item.push(None)
                item.fail(failed[item.adapter])
        return [i for i in items if i.adapter not in failed]

    def _admissible(self, items: list[WorkItem]) -> list[WorkItem]:
        """Per-request checks that depend on the model (context length, classifier head): a request that
        fails them fails alone, before it can take its batch down with it."""
        admitted = []
        for item in items:
            if item.abandoned:
                continue
            try:
                if item.kind == "generate":
                    check_generation(self.base, item)
                elif item.kind == "classify":
                    check_classify(self.lm, self.base, item.adapter)
            except Exception as exc:  # noqa: BLE001
                item.push(None)
                item.fail(exc)
                continue
            admitted.append(item)
        return admitted

    def _fail_or_isolate(self, items: list[WorkItem], exc: Exception) -> None:
        """An unexpected failure of a text batch reruns its requests one by one, so only the request that
        causes it gets the error. Generation streams as it goes, so its batch cannot be rerun; all fail."""
        if len(items) == 1 or items[0].kind == "generate":
            for item in items:
                item.push(None)
                item.fail(exc)
            return
        for item in items:
            try:
                self._run_texts([item])
            except Exception as own:  # noqa: BLE001
                item.fail(own)

    def _apply_policy(self, items: list[WorkItem]) -> None:
        adapters = [i.adapter for i in items]
        if self.policy.mode == "always" and not self.pinned:
            if self.lm.merged_adapter != adapters[0]:
                self._set_merged(adapters[0], "switch" if self.lm.merged_adapter and adapters[0] else "merge")
            return
        self.policy.observe(adapters)
        change, target = self.policy.decide(self.lm.merged_adapter, self.pinned)
        if change:
            kind = "unmerge" if target is None else ("switch" if self.lm.merged_adapter else "merge")
            self._set_merged(target, kind)

    def _run_texts(self, items: list[WorkItem]) -> None:
        texts, names, spans = [], [], []
        for item in items:
            spans.append((len(texts), len(texts) + len(item.payload)))
            texts += item.payload
            names += [item.adapter] * len(item.payload)
        fn = embed_rows if items[0].kind == "embed" else classify_rows
        rows, tokens = fn(self.lm, self.base, texts, names)
        for item, (a, b) in zip(items, spans, strict=True):
            n = sum(tokens[a:b])
            item.resolve(EmbedResult(rows[a:b], n) if item.kind == "embed" else ClassifyResult(rows[a:b], n))

    def _count(self, metric: str, tier: str) -> None:
        if self.metrics is not None:
            getattr(self.metrics, metric).labels(tier=tier).inc()


def _is_control(item: Any) -> bool:
    return callable(item) or (isinstance(item, WorkItem) and item.kind == "control")
