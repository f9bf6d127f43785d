"""`Scheduler`: the loop thread. It decides what runs when; the weights it runs on belong to WeightOwner.

    Engine (engine.py) ──put / call──► Scheduler (this file) ──residency, policy, merges──► WeightOwner
                                          │                      (weights.py: the only writer of weights)
    queue ──► gather ≤ max_batch_size items, waiting ≤ max_wait_ms (not at all while work is in hand)
          ├─ controls first: evictions after a DELETE or overwrite, merges
          ├─ embed / classify: the requests' rows join the pending rows (budget.py)
          ├─ generate: the group's adapters resident (LRU), the merge policy, then the rows join the running
          │     decode (up to max_batch_size; the rest wait, taking turns by call), prefilled in groups of
          │     ≤ max_batch_tokens
          ├─ one forward of pending rows, ≤ max_batch_tokens padded tokens, any adapter mix: its adapters
          │     resident, the merge policy, run_batch
          │     └─ at each transformer block: newly queued short requests on resident adapters overtake it
          │           (overtake.py: one small forward in the pause, ≤ overtake_tokens; the rest is deferred)
          └─ one decoding step for the running generation rows

Every forward runs under the WeightOwner's lock, and every weight change is a WeightOwner call made from this
thread, so a forward never sees half-merged weights (an overtaking forward changes none). Between two forwards
the loop takes whatever was queued meanwhile (what an overtake set aside first, in its order), and within an
embed/classify forward a short request overtakes at the next layer boundary, so a short request waits for
neither a whole long request nor a whole long forward: only for one layer of it.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from service.base_model import LoadedBase
from service.engine.batch import admissible, run_batch
from service.engine.budget import RowQueue, default_budget, plan
from service.engine.config import EngineConfig
from service.engine.decoding import Decoder
from service.engine.errors import AdapterChangedError, EngineBusyError, request_error
from service.engine.overtake import Overtaker
from service.engine.requests import WorkItem
from service.engine.weights import WeightOwner

__all__ = ["Scheduler"]

_STOP = object()  # queued by stop(): finish the running decode and the pending rows, then end the thread
log = logging.getLogger(__name__)


class Scheduler:
    """Methods whose names start with `_` run on the loop thread; the others are called from the event loop."""

    def __init__(self, base: LoadedBase, config: EngineConfig, weights: WeightOwner, metrics: Any = None) -> None:
        self.base, self.config, self.weights, self.metrics = base, config, weights, metrics
        self.max_batch_tokens = config.max_batch_tokens or default_budget(base.device)
        self.queue: queue.Queue = queue.Queue()
        self.thread: threading.Thread | None = None
        self.decoder = Decoder(weights.lm, base) if base.task == "generate" else None
        self.waiting: list[WorkItem] = []  # generation requests that cannot join the running decode
        self.rows = RowQueue(key=self._forward_key)  # embed/classify rows waiting for a forward (budget.py)
        self._splices = True  # whether this model's KV cache could be spliced at the last join (see _join)
        self.deferred: deque = deque()  # taken off the queue by an overtake but not run: next, in their order
        overtake = self.max_batch_tokens // 4 if config.overtake_tokens is None else config.overtake_tokens
        self.overtaker = Overtaker(base, weights, self.queue, self.deferred, overtake, config.max_batch_size,
                                   metrics)

    # ------------------------------------------------------------------ event-loop side
    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name="lora-engine", daemon=True)
        self.thread.start()

    async def stop(self) -> None:
        """Finish what runs, then answer whatever is still queued with 503 rather than leave it hanging."""
        if self.thread is not None:
            self.queue.put(_STOP)
            await asyncio.to_thread(self.thread.join, 30)
        if self.thread is None or not self.thread.is_alive():  # else the loop still owns it (the join timed out)
            waiting, self.waiting = self.waiting, []
            for item in waiting:
                item.fail(EngineBusyError("the service is shutting down"))
        while True:
            try:
                item = self._next(0)
            except queue.Empty:
                break
            if isinstance(item, WorkItem):
                item.fail(EngineBusyError("the service is shutting down"))

    def put(self, item: WorkItem) -> None:
        self.queue.put(item)

    def call_soon(self, fn: Callable[[], Any]) -> None:
        """Run fn on the loop thread, between batches; nobody waits for it."""
        self.queue.put(fn)

    def control(self, fn: Callable[[], Any]) -> asyncio.Future:
        """Queue fn for the loop thread now (from the event loop); its result comes in the future."""
        loop = asyncio.get_running_loop()
        item = WorkItem("control", None, fn, loop.create_future(), loop)
        self.queue.put(item)
        return item.future

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the loop thread, between batches, and await its result."""
        return await self.control(fn)

    def busy(self) -> set[str]:
        """Loop thread: keys of the adapters running generation rows use (never evicted, whatever the bounds)."""
        return self.decoder.adapters() if self.decoder is not None else set()

    def fail_adapter(self, name: str, replaced: bool) -> None:
        """Loop thread, on engine.forget: requests already running on `name` (a decode, an embedding split across
        forwards) fail with 409 rather than finish on a version that was deleted or replaced mid-way; queued
        ones run whole on the version they resolved (identity.py)."""
        if self.decoder is not None and name in self.decoder.names():
            self.decoder.fail(AdapterChangedError(name, replaced), adapter=name)
        self.rows.fail_started(name, AdapterChangedError(name, replaced))

    def _loop(self) -> None:
        stopping = False
        while True:
            decoding = self.decoder is not None and self.decoder.active
            if self.waiting and self._room() > 0:  # requests that waited for rows to end
                self._run_group(self._take_waiting(self._room()), waited=True)
                continue
            busy = decoding or bool(self.rows)
            if stopping and not busy:
                return
            first = None
            if not stopping:
                try:  # while decoding or rows are pending, never wait: that work goes on
                    first = self._next(0 if busy else None)
                except queue.Empty:
                    pass
            if first is _STOP:
                stopping = True  # the running decode and the pending rows finish; nothing new is taken
            elif first is not None:
                batch, controls = self._gather(first, wait=not busy)
                # Controls first: an eviction after a DELETE or overwrite, or a merge, was asked for before (or
                # while) these requests queued, so they must see its effect, never the stale weights.
                for control in controls:
                    self._run_control(control)
                for group in self._groups(batch):
                    if group[0].kind == "generate":
                        self._run_group(group)
                    else:
                        for item in group:
                            self.rows.add(item)
            if self.rows:
                self._run_group(self.rows.take(self.max_batch_tokens, self.config.max_batch_size))
            if self.decoder is not None and self.decoder.active:
                self._step()

    def _forward_key(self, item: WorkItem) -> object:
        """Which pending rows may share a forward: the same kind, and under the merge-always baseline the
        same adapter (one forward per adapter, as `_groups` does for generation)."""
        return (item.kind, item.key) if self.weights.policy.mode == "always" else item.kind

    def _room(self) -> int:
        """How many more rows the running decode takes now: up to max_batch_size, and none mid-decode when
        this model's cache cannot take newcomers."""
        return self.config.max_batch_size - self.decoder.running() if self.decoder.can_join() else 0

    def _gather(self, first: Any, wait: bool = True) -> tuple[list[WorkItem], list[Any]]:
        batch: list[WorkItem] = []
        controls: list[Any] = []
        (controls if _is_control(first) else batch).append(first)
        if not batch:
            return batch, controls
        deadline = time.perf_counter() + (self.config.max_wait_ms / 1000 if wait else 0.0)
        while len(batch) < self.config.max_batch_size:
            remaining = deadline - time.perf_counter()
            try:
                item = self._next(max(remaining, 0))
            except queue.Empty:
                break
            if item is _STOP:
                self.deferred.appendleft(_STOP)  # taken next, after this batch
                break
            (controls if _is_control(item) else batch).append(item)
        return batch, controls

    def _next(self, timeout: float | None) -> Any:
        """The next item: those an overtake set aside first, in their order, then the queue's. `timeout`: None
        waits for one, 0 does not wait; queue.Empty if there is none."""
        if self.deferred:
            return self.deferred.popleft()
        return self.queue.get(timeout=timeout) if timeout else self.queue.get(block=timeout is None)

    def _groups(self, batch: list[WorkItem]) -> list[list[WorkItem]]:
        by_kind: dict[str, list[WorkItem]] = {}
        for item in batch:
            by_kind.setdefault(item.kind, []).append(item)
        groups = list(by_kind.values())
        if self.weights.policy.mode == "always":  # the merge-always baseline: one forward per adapter
            groups = [[i for i in g if i.key == a] for g in groups for a in dict.fromkeys(i.key for i in g)]
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

    def _run_group(self, items: list[WorkItem], waited: bool = False) -> None:
        """Generation requests join the decode; embed and classify parts (budget.Part) run one forward."""
        if not items:
            return
        generate = items[0].kind == "generate"
        if generate and not waited and (self.waiting or len(items) > self._room()):  # they queue, taking turns
            self.waiting.extend(items)
            items = self._take_waiting(max(self._room(), 0))
            if not items:
                return
        started = time.perf_counter()
        weights = self.weights
        with weights.lock:
            try:
                items = admissible(weights.lm, self.base, weights.make_resident(items, protect=self.busy()))
                if not items:
                    return
                weights.apply_policy(items, protect=self.busy())
                if generate:
                    self._join(items)
                else:
                    with self.overtaker.armed():
                        run_batch(weights.lm, self.base, items)
            finally:
                weights.trim(protect=self.busy())  # a batch may overshoot the bounds; not beyond it
        if self.metrics is not None:
            self.metrics.batch_size.observe(len(items))
            if not generate:  # a decode's time is observed per step
                self.metrics.forward_seconds.observe(time.perf_counter() - started)

    def _take_waiting(self, n: int) -> list[WorkItem]:
        """Up to n waiting generation requests, round-robin across the calls they came from (an HTTP request
        with many prompts is one call), first come first within each: a call with thousands of prompts then
        holds back a later one by at most one turn, not by all of its prompts."""
        calls: dict[object, list[WorkItem]] = {}
        for item in self.waiting:
            calls.setdefault(item.payload.origin or id(item), []).append(item)
        queues, taken = list(calls.values()), []
        while len(taken) < n and any(queues):
            for queue_ in queues:
                if queue_ and len(taken) < n:
                    taken.append(queue_.pop(0))
        chosen = {id(item) for item in taken}
        self.waiting = [item for item in self.waiting if id(item) not in chosen]
        return taken

    def _join(self, items: list[WorkItem]) -> None:
        """Prefill the newcomers in groups of similar length within the token budget (not all padded to the
        longest prompt), each group spliced into the running decode in turn. A model whose cache cannot be
        spliced prefills them all at once, into a static batch, as before."""
        lengths = [len(item.encoded[0]) for item in items]
        groups = plan(lengths, self.max_batch_tokens) if self._splices else [list(range(len(items)))]
        for n, group in enumerate(groups):
            if self.decoder.active and not self.decoder.can_join():
                # That shows only once a first group runs: the rest wait for the decode to end.
                self.waiting[:0] = [items[i] for g in groups[n:] for i in g]
                return
            self._join_group([items[i] for i in group])
            if self.decoder.active:
                self._splices = self.decoder.can_join()

    def _join_group(self, items: list[WorkItem]) -> None:
        """One prefill; if it fails, its requests are prefilled one by one, as run_batch does, so only the request
        at fault fails and the running rows go on."""
        try:
            self.decoder.join(items)
        except Exception as exc:  # noqa: BLE001
            if len(items) == 1:
                items[0].fail(request_error(exc))
                return
            log.warning("a prefill of %d requests failed; running them one by one", len(items), exc_info=exc)
            for item in items:
                try:
                    self.decoder.join([item])
                except Exception as own:  # noqa: BLE001
                    item.fail(request_error(own))

    def _step(self) -> None:
        started = time.perf_counter()
        with self.weights.lock:
            try:
                self.decoder.step()
            except Exception as exc:  # noqa: BLE001 - the rows share this forward, so all of them fail
                self.decoder.fail(request_error(exc))
            finally:
                self.weights.trim(protect=self.busy())  # rows that ended no longer hold their adapters
        if self.metrics is not None:
            self.metrics.forward_seconds.observe(time.perf_counter() - started)


def _is_control(item: Any) -> bool:
    return callable(item) or (isinstance(item, WorkItem) and item.kind == "control")
