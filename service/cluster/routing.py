"""Request routers for the replica deployment (Ray Serve's alpha `RequestRouter` API, 2.60).

    affinity   AdapterAffinityRouter: rendezvous hashing of `name@sha256` over the replicas (affinity.py),
               spilling to the second choice when the home's queue reaches `spill_at`
    multiplex  RayMultiplexRouter: Ray's default (power of two choices + MultiplexMixin), the baseline
    spread     the same router, but the ingress sends no multiplexed id: placement ignores the adapter

Both honour one extra rule: a multiplexed id `@replica:<id>` addresses exactly that replica. Serve's
handle has no broadcast, and this is how the ingress sends one admin call (state, metrics, reconcile
the pins) to every replica, whatever router the data requests use.

Affinity tracks its own in-flight count per replica (on_request_routed / on_request_completed run once
per dispatched request), which is exact for the ingress that sends them, instead of Ray's queue-length
cache, which is probed lazily. The routers register themselves (weakly) so that the ingress process can
list the replicas its handle currently routes to (`live_replica_ids`).
"""

from __future__ import annotations

import importlib
import weakref
from collections import Counter, deque
from typing import Any

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from service.cluster.affinity import control_target, placement, rendezvous_order

__all__ = ["AdapterAffinityRouter", "RayMultiplexRouter", "live_replica_ids", "routing_stats", "ROUTERS"]

_WINDOW = 64  # requests per replica the dominance is judged on (as the engine's merge policy's window)
_SHARE_WINDOW = 256  # adapter requests a key's share of the traffic is judged on
_LIVE: weakref.WeakSet = weakref.WeakSet()  # the routers of this process (see _registry)


def _registry() -> weakref.WeakSet:
    # Serve ships the router class to the handle's process by cloudpickle, which may copy it by value with
    # its own copy of this module's globals; a lookup through sys.modules always reaches the one registry.
    return importlib.import_module("service.cluster.routing")._LIVE


def routing_stats(deployment: str) -> dict[str, int]:
    """Where the affinity routers of this process sent adapter requests: to the key's home, or away."""
    total: Counter[str] = Counter()
    for router in list(_registry()):
        if router._deployment_id.name == deployment:
            total.update(getattr(router, "stats", {}))
    return dict(total)


def live_replica_ids(deployment: str) -> list[str]:
    """Unique ids of the running replicas of `deployment`, as the routers in this process see them."""
    ids: set[str] = set()
    for router in list(_registry()):
        if router._deployment_id.name == deployment:
            ids.update(rid.unique_id for rid in list(router.curr_replicas))
    return sorted(ids)


class _Targeting:
    """A request whose multiplexed id is `@replica:<id>` goes to that replica only (and waits, with backoff,
    while it is busy or gone: the caller's timeout bounds it)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _registry().add(self)

    def _targeted(self, candidates: list[RunningReplica], pending: PendingRequest | None
                  ) -> list[list[RunningReplica]] | None:
        target = control_target(pending.metadata.multiplexed_model_id) if pending is not None else None
        if target is None:
            return None
        pending.routing_context.should_backoff = True
        return [[r for r in candidates if r.replica_id.unique_id == target]]


class AdapterAffinityRouter(_Targeting, RequestRouter):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.spill_at = 4
        self.in_flight: Counter[str] = Counter()  # replica unique id -> requests dispatched, not completed
        self.stats: Counter[str] = Counter()  # home / away / shared: where adapter requests went, and why
        self.recent: dict[str, deque[str]] = {}  # replica unique id -> keys of the last requests routed to it
        self.lately: deque[str] = deque(maxlen=_SHARE_WINDOW)  # keys of the last adapter requests, all replicas
        self.shares: Counter[str] = Counter()  # key -> its count in `lately`

    def initialize_state(self, spill_at: int = 4, **kwargs: Any) -> None:
        self.spill_at = spill_at

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        targeted = self._targeted(candidate_replicas, pending_request)
        if targeted is not None:
            return targeted
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # all ranks full: back off, do not spin
        key = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        if not key:  # the base model, or no adapter: any replica, the shortest queue wins
            return [candidate_replicas]
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        dominant = {i: self._dominant(i) for i in by_id}
        share = self.shares[key] / len(self.lately) if len(self.lately) >= _SHARE_WINDOW // 4 else 0.0
        ranks = placement(key, by_id, self.in_flight, self.spill_at, share=share, dominant=dominant)
        if len(ranks[0]) > 1:
            self.stats["shared"] += 1
        return [[by_id[i] for i in rank] for rank in ranks]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        self.in_flight[replica_id.unique_id] += 1
        key = pending_request.metadata.multiplexed_model_id
        if control_target(key) is None:
            self.recent.setdefault(replica_id.unique_id, deque(maxlen=_WINDOW)).append(key or "")
        if key and control_target(key) is None:
            if len(self.lately) == self.lately.maxlen:
                oldest = self.lately[0]
                self.shares[oldest] -= 1
                if not self.shares[oldest]:
                    del self.shares[oldest]
            self.lately.append(key)
            self.shares[key] += 1
            order = rendezvous_order(key, (r.unique_id for r in self.curr_replicas))
            self.stats["home" if order and order[0] == replica_id.unique_id else "away"] += 1

    def _dominant(self, replica: str) -> str | None:
        """The key with at least half of the replica's recent requests (a full window), if any."""
        window = self.recent.get(replica)
        if window is None or len(window) < _WINDOW:
            return None
        key, count = Counter(window).most_common(1)[0]
        return key if key and count * 2 >= len(window) else None

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        uid = replica_id.unique_id
        if self.in_flight[uid] > 0:
            self.in_flight[uid] -= 1

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.in_flight.pop(replica_id.unique_id, None)
        self.recent.pop(replica_id.unique_id, None)


class RayMultiplexRouter(_Targeting, PowerOfTwoChoicesRequestRouter):
    """Ray's default router, unchanged for data requests (the baseline in benchmarks/bench_cluster.py)."""

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        targeted = self._targeted(candidate_replicas, pending_request)
        if targeted is not None:
            return targeted
        return await super().choose_replicas(candidate_replicas, pending_request)


ROUTERS = {"affinity": AdapterAffinityRouter, "multiplex": RayMultiplexRouter, "spread": RayMultiplexRouter}
