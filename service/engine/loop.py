"""The engine's loop thread: the only code that runs forwards and changes weights, always under the lock.

    queue ──► gather ≤ max_batch_size items, waiting ≤ max_wait_ms (not at all while work is in hand)
          ├─ controls first: evictions after a DELETE or overwrite, merges
          ├─ embed / classify: the requests' rows join the pending rows (budget.py)
          ├─ generate: the group's adapters resident (LRU), the merge policy, then the rows join the running
          │     decode (up to max_batch_size; the rest wait), prefilled in groups of ≤ max_batch_tokens
          ├─ one forward of pending rows, ≤ max_batch_tokens padded tokens, any adapter mix: its adapters
          │     resident, the merge policy, run_batch
          └─ one decoding step for the running generation rows

Between two forwards the loop takes whatever was queued meanwhile, so a short request never waits for all
of a long one: only for the forward in flight.

`LoopThread` is the loop-thread half of `Engine` (engine.py), which sets the state used here and keeps
the public, event-loop-side API.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from adapters import LoraModel, LoraWeights, MergeError
from service.base_model import LoadedBase
from service.engine.batch import admissible, run_batch
from service.engine.budget import RowQueue, default_budget, plan
from service.engine.errors import request_error
from service.engine.requests import WorkItem

if TYPE_CHECKING:
    from collections import OrderedDict

    from service.engine.decoding import Decoder
    from service.engine.policy import MergePolicy
    from service.engine.tiers import AdapterTiers

__all__ = ["STOP", "LoopThread"]

STOP = object()  # queued by Engine.stop: finish the running decode, then end the thread
log = logging.getLogger(__name__)


class LoopThread:
    """Every method here runs on the loop thread."""

    lm: LoraModel
    base: LoadedBase
    settings: Any
    metrics: Any
    lock: threading.RLock
    tiers: AdapterTiers
    resident: OrderedDict[str, tuple[str, int]]
    policy: MergePolicy
    pinned: bool
    decoder: Decoder | None
    _queue: queue.Queue
    _waiting: list[WorkItem]
    _rows: RowQueue  # the pending rows of embed and classify requests
    _splices = True  # whether this model's KV cache could be spliced at the last join (see _join)

    _set_merged: Callable[..., None]  # Engine's: merge (or unmerge) under the lock, protecting the given adapters

    def _loop(self) -> None:
        stopping = False
        while True:
            decoding = self.decoder is not None and self.decoder.active
            if self._waiting and self._room() > 0:  # requests that waited for rows to end
                self._run_group(self._take_waiting(self._room()), waited=True)
                continue
            busy = decoding or bool(self._rows)
            if stopping and not busy:
                return
            first = None
            if not stopping:
                try:  # while decoding or rows are pending, never wait: that work goes on
                    first = self._queue.get_nowait() if busy else self._queue.get()
                except queue.Empty:
                    pass
            if first is STOP:
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
                            self._rows.add(item)
            if self._rows:
                self._run_group(self._rows.take(self._max_batch_tokens(), self.settings.max_batch_size))
            if self.decoder is not None and self.decoder.active:
                self._step()

    def _max_batch_tokens(self) -> int:
        return getattr(self.settings, "max_batch_tokens", None) or default_budget(self.base.device)

    def _forward_key(self, item: WorkItem) -> object:
        """Which pending rows may share a forward: the same kind, and under the merge-always baseline the
        same adapter (one forward per adapter, as `_groups` does for generation)."""
        return (item.kind, item.adapter) if self.policy.mode == "always" else item.kind

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
            if item is STOP:
                self._queue.put(STOP)
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

    def _run_group(self, items: list[WorkItem], waited: bool = False) -> None:
        """Generation requests join the decode; embed and classify parts (budget.Part) run one forward."""
        if not items:
            return
        generate = items[0].kind == "generate"
        if generate and not waited and (self._waiting or len(items) > self._room()):  # they queue, taking turns
            self._waiting.extend(items)
            items = self._take_waiting(max(self._room(), 0))
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

    def _take_waiting(self, n: int) -> list[WorkItem]:
        """Up to n waiting generation requests, round-robin across the calls they came from (an HTTP request
        with many prompts is one call), first come first within each: a call with thousands of prompts then
        holds back a later one by at most one turn, not by all of its prompts."""
        calls: dict[object, list[WorkItem]] = {}
        for item in self._waiting:
            calls.setdefault(item.payload.origin or id(item), []).append(item)
        queues, taken = list(calls.values()), []
        while len(taken) < n and any(queues):
            for queue_ in queues:
                if queue_ and len(taken) < n:
                    taken.append(queue_.pop(0))
        chosen = {id(item) for item in taken}
        self._waiting = [item for item in self._waiting if id(item) not in chosen]
        return taken

    def _join(self, items: list[WorkItem]) -> None:
        """Prefill the newcomers in groups of similar length within the token budget (not all padded to the
        longest prompt), each group spliced into the running decode in turn. A model whose cache cannot be
        spliced prefills them all at once, into a static batch, as before."""
        lengths = [len(item.encoded[0]) for item in items]
        groups = plan(lengths, self._max_batch_tokens()) if self._splices else [list(range(len(items)))]
        for n, group in enumerate(groups):
            if self.decoder.active and not self.decoder.can_join():
                # That shows only once a first group runs: the rest wait for the decode to end.
                self._waiting[:0] = [items[i] for g in groups[n:] for i in g]
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
        with self.lock:
            try:
                self.decoder.step()
            except Exception as exc:  # noqa: BLE001 - the rows share this forward, so all of them fail
                self.decoder.fail(request_error(exc))
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


def _is_control(item: Any) -> bool:
    return callable(item) or (isinstance(item, WorkItem) and item.kind == "control")
