"""Token-budget batching: which rows share a forward, so that one long input never pads everyone else.

A forward's cost is about rows × padded length (every row is padded to the longest), so rows are planned
into forwards by that product, as text-embeddings-inference does with `--max-batch-tokens`:

    pending rows, shortest first ──► one forward: n rows, width w = its longest row
                                       n · w ≤ budget          (a single row over the budget runs alone)
                                       shortest ≥ w / 2        (unless w ≤ SMALL_WIDTH: tiny rows mix freely)

So 200 short texts and one of 512 tokens are a few forwards of short rows and one of the long row, not
201 rows of 512. `plan` groups a fixed set of rows (a generation prefill); `RowQueue` holds the pending
rows of embed and classify requests between forwards, so the loop can take newly queued requests in
between. Each forward is anchored on the request that has waited longest since it last had rows run (a
newcomer, or a long request whose previous forward just ended goes behind it), and other requests join it
when all their remaining rows fit what the budget and the length rule leave: a short request sent while a
long one runs waits at most for the forward in flight (less when it overtakes that forward at a layer
boundary: overtake.py), then runs without a slice of the long one padding its own forward, and a long
request gets a forward at least once per turn of the queue, so nobody starves. A request resolves when all
its rows are done, with its values in its own order.
"""

from __future__ import annotations

import bisect
import copy
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from service.engine.requests import ClassifyResult, EmbedResult, WorkItem

__all__ = ["SMALL_WIDTH", "default_budget", "plan", "Part", "RowQueue"]

# Rows up to this many tokens share a forward whatever their lengths: padding 5 tokens to 32 costs less
# than another forward's fixed overhead (Python, one kernel per layer op).
SMALL_WIDTH = 32


def default_budget(device: Any) -> int:
    """Padded tokens per forward when --max-batch-tokens is not given. A GPU needs large forwards to fill it
    (TEI's default is 16384). A CPU does not: MiniLM costs 0.31-0.35 ms of CPU per padded token from 256
    tokens per forward up to 16384 (docs/benchmarks.md), so a larger budget buys no throughput, only a longer
    wait for whoever arrives while it runs. 512 keeps every forward within what one 512-token text costs
    alone, which any request carrying one pays anyway."""
    return 512 if getattr(device, "type", str(device)) == "cpu" else 16384


class _Forward:
    """The shape of one forward being planned: n rows padded to `width`."""

    def __init__(self, budget: int) -> None:
        self.budget, self.n, self.width, self.shortest = budget, 0, 0, 0

    def admits(self, length: int) -> bool:
        if self.n == 0:
            return True  # at least one row, however long: it runs alone
        width, shortest = max(self.width, length), min(self.shortest, length)
        return (self.n + 1) * width <= self.budget and (width <= SMALL_WIDTH or 2 * shortest >= width)

    def add(self, length: int) -> None:
        self.shortest = length if self.n == 0 else min(self.shortest, length)
        self.n, self.width = self.n + 1, max(self.width, length)


def plan(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices of `lengths` grouped into forwards, shortest rows first, each group within the budget and
    the length rule. Every index appears exactly once."""
    groups: list[list[int]] = []
    forward = _Forward(budget)
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):  # stable: equal lengths keep their order
        if not forward.admits(lengths[i]):
            forward = _Forward(budget)
        if forward.n == 0:
            groups.append([])
        forward.add(lengths[i])
        groups[-1].append(i)
    return groups


@dataclass(eq=False)
class _Request:
    """One embed or classify request's progress through its forwards."""

    item: WorkItem
    since: float  # when it last got in line: its arrival, or the end of its last forward
    pending: list[int] = field(default_factory=list)  # row indices not yet planned, shortest first
    values: list[Any] = field(default_factory=list)  # per row, in the request's order
    left: int = 0  # rows not yet answered
    tokens: int = 0
    failed: bool = False

    def __post_init__(self) -> None:
        rows = self.item.encoded
        self.pending = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        self.values, self.left = [None] * len(rows), len(rows)

    @property
    def live(self) -> bool:
        return not self.failed and not self.item.abandoned and self.left > 0

    def take(self, forward: _Forward, whole: bool = False) -> list[int]:
        """The pending rows that fit `forward`, shortest first (they join it); with `whole`, all of them or
        none."""
        rows, taken, kept = self.item.encoded, [], []
        trial = copy.copy(forward) if whole else forward
        for k, i in enumerate(self.pending):
            length = len(rows[i])
            if trial.admits(length):
                trial.add(length)
                taken.append(i)
            elif length >= trial.width and ((trial.n + 1) * length > trial.budget or 2 * trial.shortest < length):
                kept += self.pending[k:]  # the rest are as long or longer: none fits
                break
            else:
                kept.append(i)
        if whole and kept:
            return []
        if whole:
            forward.__dict__.update(trial.__dict__)
        self.pending = kept
        return taken


class Part:
    """Some rows of one request, run in one forward. It stands in for the WorkItem in `run_batch`
    (the same attributes), and gathers its rows' results into the request's answer."""

    def __init__(self, request: _Request, rows: list[int]) -> None:
        self.request, self.rows, self.item = request, rows, request.item
        self.kind, self.adapter, self.preloaded = self.item.kind, self.item.adapter, self.item.preloaded
        self.encoded = [self.item.encoded[i] for i in rows]

    @property
    def ref(self):  # the adapter version it runs with (identity.py)
        return self.item.ref

    @property
    def key(self) -> str | None:
        return self.item.key

    @property
    def abandoned(self) -> bool:
        return self.item.abandoned or self.request.failed

    def resolve(self, result: EmbedResult | ClassifyResult) -> None:
        req = self.request
        if req.failed:
            return
        values = result.embeddings if isinstance(result, EmbedResult) else result.results
        for i, value in zip(self.rows, values, strict=True):
            req.values[i] = value
        req.tokens += result.prompt_tokens
        req.left -= len(self.rows)
        if req.left == 0:
            req.item.resolve(type(result)(req.values, req.tokens))

    def fail(self, exc: BaseException) -> None:
        """The whole request fails (once): its other rows are dropped from the queue."""
        if not self.request.failed:
            self.request.failed = True
            self.item.fail(exc)


class RowQueue:
    """The pending rows of embed and classify requests, planned one forward at a time (loop thread only).

    `key(item)` says which requests may share a forward (the same kind; under the `always` merge policy
    also the same adapter). `clock` is time.perf_counter, the clock of WorkItem.enqueued_at."""

    def __init__(self, key: Callable[[WorkItem], Hashable] = lambda item: item.kind,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.key, self.clock = key, clock
        self._line: list[_Request] = []  # by `since`: the first one anchors the next forward
        self._running: list[_Request] = []  # those of the last forward planned

    def __bool__(self) -> bool:
        return any(r.live for r in self._line) or any(r.live and r.pending for r in self._running)

    def add(self, item: WorkItem) -> None:
        self._queue(_Request(item, item.enqueued_at))

    def _queue(self, request: _Request) -> None:
        bisect.insort(self._line, request, key=lambda r: r.since)

    def take(self, budget: int, max_requests: int | None = None) -> list[Part]:
        """The next forward: the rows of the longest-waiting request that fit the budget, shortest first,
        then every other request (in line order) whose remaining rows all fit what is left, from at most
        `max_requests` requests. Empty when nothing is pending."""
        now = self.clock()
        for request in self._running:  # the last forward has ended: those requests get back in line
            if request.live and request.pending:
                request.since = now
                self._queue(request)
        self._running = []
        self._line = [r for r in self._line if r.live and r.pending]
        if not self._line:
            return []
        key, forward, parts = self.key(self._line[0].item), _Forward(budget), []
        for request in self._line:
            if len(parts) == max_requests:
                break
            # Another request joins only if this forward finishes it: a slice of a request that needs more
            # forwards anyway would not answer it sooner, only make the anchor's forward (its wait) longer.
            if self.key(request.item) == key and (rows := request.take(forward, whole=bool(parts))):
                parts.append(Part(request, rows))
        self._running = [p.request for p in parts]
        served = {id(r) for r in self._running}
        self._line = [r for r in self._line if id(r) not in served]
        return parts

    def fail_started(self, adapter: str | None, exc: BaseException) -> None:
        """Fail the requests of `adapter` that have answered some rows and still have some to run: their
        remaining rows would see other weights (the adapter was replaced or deleted). The others run later
        on whatever is stored then, as a request queued behind the change would."""
        for request in self._line + self._running:
            started = request.left < len(request.values)
            if request.live and started and request.item.adapter == adapter:
                request.failed = True
                request.item.fail(exc)
