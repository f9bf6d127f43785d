"""Overtaking at layer boundaries: a short embed/classify request does not wait for a whole long forward.

One 512-token text is a single forward (about 120 ms for MiniLM on a CPU core), and a one-text request that
arrives as it starts would wait for all of it. So while an embed/classify forward runs, a pre-hook on each of
the base's transformer blocks looks at the queue; when something is there, the forward pauses at that layer
boundary and, on the same thread (the model's Router is shared by every layer), the new requests that
qualify run as one small forward of their own:

    paused forward: embeddings ─► block 0 ─► block 1 ─► … ─► block N-1 ─► pooling
                                            ▲ pre-hook: armed, not overtaking already, queue not empty
                                            └─ take everything queued, in order:
                                                 ├─ qualifying: one forward per kind (run_batch) inside
                                                 │    LoraModel.routing_kept(); then the paused one goes on
                                                 └─ the rest: `deferred`, which the loop takes before the queue

Qualifying: an embed or classify request queued before any control (an eviction after a DELETE or overwrite,
a merge: requests queued after one must see its effect), whose adapter is already resident (and, under the
merge-always baseline, the merged one), whose rows fit `budget` padded tokens with the others chosen. Nothing
here loads, merges, evicts or trims: the weights stay exactly as the paused forward expects them. An overtaking
forward does not arm the hooks (no nesting), and its errors fail only its own requests (run_batch), never the
paused forward.
"""

from __future__ import annotations

import logging
import queue
import time
from collections import deque
from contextlib import contextmanager
from typing import Any

from torch import nn

from service.base_model import LoadedBase
from service.engine.batch import admissible, run_batch
from service.engine.errors import request_error
from service.engine.requests import WorkItem
from service.engine.weights import WeightOwner

__all__ = ["Overtaker", "transformer_blocks"]

log = logging.getLogger(__name__)
_TEXTS = ("embed", "classify")


def transformer_blocks(model: nn.Module) -> nn.ModuleList | None:
    """The model's stack of transformer blocks, found without knowing the family: the longest nn.ModuleList
    whose members are all of one class (BERT's encoder.layer, Llama's layers, GPT-2's h). None if there is none."""
    best = None
    for module in model.modules():
        if (isinstance(module, nn.ModuleList) and len(module) > 1 and len({type(m) for m in module}) == 1
                and (best is None or len(module) > len(best))):
            best = module
    return best


class Overtaker:
    """Loop thread only. `deferred` is shared with the Scheduler, which takes its items before the queue's."""

    def __init__(self, base: LoadedBase, weights: WeightOwner, work: queue.Queue, deferred: deque,
                 budget: int, max_requests: int, metrics: Any = None) -> None:
        self.base, self.weights, self.work, self.deferred = base, weights, work, deferred
        self.metrics = metrics
        self.budget, self.max_requests = budget, max_requests
        self._armed = False
        blocks = transformer_blocks(base.model) if budget > 0 and base.task != "generate" else None
        self._hooks = [block.register_forward_pre_hook(self._boundary) for block in blocks or []]

    @contextmanager
    def armed(self):
        """Around an embed/classify forward: the forward may be overtaken at its layer boundaries."""
        self._armed = True
        try:
            yield
        finally:
            self._armed = False

    def _boundary(self, _module: nn.Module, _args: Any) -> None:
        if not self._armed or self.work.empty():  # the common case: two attribute reads and one lock
            return
        self._armed = False  # no nesting: the overtaking forward runs through these same blocks
        try:
            self._overtake()
        except Exception:  # noqa: BLE001 - never the paused forward's failure
            log.exception("overtaking a forward failed; the paused forward goes on")
        finally:
            self._armed = True

    def _overtake(self) -> None:
        chosen = self._choose(self._drain())
        if not chosen:
            return
        lm = self.weights.lm
        with lm.routing_kept():
            for kind in _TEXTS:
                group = [item for item in chosen if item.kind == kind]
                try:
                    group = admissible(lm, self.base, group)
                    if group:
                        started = time.perf_counter()
                        run_batch(lm, self.base, group)  # one forward; a failure reruns them one by one
                        if self.metrics is not None:  # a forward like any other in lora_batch_size / _seconds
                            self.metrics.batch_size.observe(len(group))
                            self.metrics.forward_seconds.observe(time.perf_counter() - started)
                except Exception as exc:  # noqa: BLE001 - those requests' outcome, not the paused forward's
                    for item in group:
                        item.fail(request_error(exc))

    def _drain(self) -> list[Any]:
        taken = []
        while True:
            try:
                taken.append(self.work.get_nowait())
            except queue.Empty:
                return taken

    def _choose(self, taken: list[Any]) -> list[WorkItem]:
        """The items that run now; the others go to `deferred` in their order. Once a control is seen (set aside
        earlier, or among these), nothing after it overtakes: it must see the control's effect."""
        barrier = any(not _is_request(item) for item in self.deferred)
        chosen: list[WorkItem] = []
        shape: dict[str, tuple[int, int]] = {}  # kind -> (rows, width) of its forward so far
        for item in taken:
            barrier = barrier or not _is_request(item)
            try:
                runs_now = not barrier and self._qualifies(item, chosen, shape)
            except Exception:  # noqa: BLE001 - an item taken off the queue must never be lost: it waits its turn
                log.exception("could not tell whether a request may overtake; it waits for its turn")
                runs_now = False
            if runs_now:
                rows, width = shape.get(item.kind, (0, 0))
                shape[item.kind] = (rows + len(item.encoded), max([width] + [len(r) for r in item.encoded]))
                chosen.append(item)
            else:
                self.deferred.append(item)
        return chosen

    def _qualifies(self, item: WorkItem, chosen: list[WorkItem], shape: dict[str, tuple[int, int]]) -> bool:
        if item.kind not in _TEXTS or len(chosen) >= self.max_requests or item.abandoned:
            return False
        if item.ref is not None and not self.weights.is_resident(item.ref):
            return False  # a load would change what the paused forward runs on
        if self.weights.policy.mode == "always" and item.key != self.weights.lm.merged_adapter:
            return False  # the baseline: one adapter per forward, merged
        rows, width = shape.get(item.kind, (0, 0))
        rows, width = rows + len(item.encoded), max([width] + [len(r) for r in item.encoded])
        others = sum(n * w for kind, (n, w) in shape.items() if kind != item.kind)
        return rows * width + others <= self.budget


def _is_request(item: Any) -> bool:
    """An inference request, as opposed to a control (a callable or a control WorkItem) or the stop marker."""
    return isinstance(item, WorkItem) and item.kind != "control"
