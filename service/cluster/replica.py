"""LoraReplica: one engine replica, today's `Engine` on its own copy of the base model.

Requests arrive with their adapter already resolved to a key `name@sha256` (by the ingress); the Engine
is handed a `PinnedStore`, so its caches are keyed by that immutable version and an overwrite can never
be answered from the old weights. Each replica runs its own merge policy on the traffic it receives: with
adapter-affinity routing, a replica that gets mostly one adapter merges it.

`@serve.multiplexed` is used for bookkeeping only: it reports the keys each replica holds to Ray (what
Ray's default multiplexed router places by) and keeps the same LRU bound as the engine's device cache,
so both see the same accesses and evict alike. The weights themselves are managed by the Engine.

Admin calls arrive one per replica through `control(op)` (see routing.py). The merge pins live in the
store's index (store_view.ClusterPins): a replica applies them on start, every `cluster_pin_poll_s`, and
at once when an ingress asks, so a restarted replica comes back pinned.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from adapters import UnknownAdapterError
from service.cluster.affinity import parse_key, short_key
from service.cluster.store_view import ClusterPins, PinnedStore, open_store
from service.engine import CompletionChunk, CompletionRequest, Engine, load_base_model
from service.metrics import Metrics

__all__ = ["replica_class"]

log = logging.getLogger("service.cluster")


def replica_class(cache_slots: int) -> type:
    """The deployment class, with Serve's multiplexing LRU sized like the engine's device cache."""

    class LoraReplica:
        async def __init__(self, settings: Any) -> None:
            self.settings = settings
            self.store = PinnedStore(open_store(settings))
            self.pins = ClusterPins(self.store.store)
            self.metrics = Metrics()
            base = await asyncio.to_thread(load_base_model, settings.base_model, settings.device, settings.dtype,
                                           settings.task)
            self.engine = Engine(base, settings, self.store, self.metrics)
            await self.engine.start()
            self.replica_id = serve.get_replica_context().replica_id.unique_id
            self.started_at, self.served = time.time(), 0
            self.by_adapter: Counter[str] = Counter()  # requests per key served here (its busiest in /v1/state)
            await self._reconcile(strict=False)
            self._poller = asyncio.get_running_loop().create_task(self._poll_pins())

        @serve.multiplexed(max_num_models_per_replica=cache_slots)
        async def _slot(self, key: str) -> str:
            return key

        async def _enter(self, key: str) -> None:
            self.served += 1
            self.by_adapter[key] += 1
            if serve.get_multiplexed_model_id():  # routed by adapter: keep Ray's view of this replica current
                await self._slot(key)

        # -------------------------------------------------------------- inference (the Engine's API)
        async def embed(self, key: str, texts: list[str], prompt: str | None = None,
                        prompt_name: str | None = None) -> Any:
            await self._enter(key)
            return await self.engine.embed(key, texts, prompt=prompt, prompt_name=prompt_name)

        async def classify(self, key: str, texts: list[str]) -> Any:
            await self._enter(key)
            return await self.engine.classify(key, texts)

        async def complete(self, request: CompletionRequest) -> Any:
            await self._enter(request.model)
            return await self.engine.complete(request)

        async def stream(self, request: CompletionRequest) -> AsyncIterator[CompletionChunk]:
            await self._enter(request.model)
            async for chunk in self.engine.stream(request):
                yield chunk

        # -------------------------------------------------------------- admin, one call per replica
        async def control(self, op: str, arg: Any = None) -> Any:
            if op == "ping":
                return self.replica_id
            if op == "state":
                return await self._state(fingerprints=bool(arg))
            if op == "metrics":
                return self.metrics.render()
            if op == "reconcile":
                await self._reconcile(strict=True)
                return await self._state(fingerprints=False)
            if op == "forget":  # `arg` was overwritten or deleted: follow the pins, then drop its old versions
                await self._reconcile(strict=False)
                self._drop_stale(arg)
                return None
            raise ValueError(f"unknown control operation {op!r}")

        async def check_health(self) -> None:
            if not self.engine.ready:
                raise RuntimeError("the engine is not running")

        async def _reconcile(self, *, strict: bool) -> None:
            """Make this replica's explicit merge match the pins record. `strict`: raise a refused merge."""
            want = (await asyncio.to_thread(self.pins.read)).get("merged")
            merged_ref = self.engine.weights.merged  # read-only peek: no control item on the loop each poll
            merged = merged_ref.name if merged_ref is not None else None  # a key, name@sha256
            key = None
            if want is not None:
                try:
                    key = await asyncio.to_thread(self.store.key_of, want)
                except UnknownAdapterError:
                    key = None  # the pinned adapter was deleted: nothing to merge
            try:
                if key is None and self.engine.weights.pinned:
                    await self.engine.unmerge()
                elif key is not None and (merged != key or not self.engine.weights.pinned):
                    await self.engine.merge(key)
            except Exception:
                if strict:
                    raise
                log.exception("replica %s: could not apply the pinned merge %r", self.replica_id, want)

        async def _poll_pins(self) -> None:
            while True:
                await asyncio.sleep(self.settings.cluster_pin_poll_s)
                try:
                    await self._reconcile(strict=False)
                except Exception:  # noqa: BLE001 - e.g. the store briefly unreadable: try again next time
                    log.exception("replica %s: could not read the merge pins", self.replica_id)

        def _drop_stale(self, name: str) -> None:
            try:
                current = self.store.key_of(name)
            except UnknownAdapterError:
                current = None
            owner = self.engine.weights
            cached = {ref.name for ref, _ in owner.tiers.resident.values()} | set(owner.host.names())
            for key in cached:
                if parse_key(key)[0] == name and key != current:
                    self.engine.forget(key)

        def _count(self, tier: str) -> int:
            value = self.metrics.registry.get_sample_value("lora_adapter_loads_total", {"tier": tier})
            return int(value or 0)

        async def _state(self, fingerprints: bool) -> dict[str, Any]:
            state = await self.engine.state(fingerprints=fingerprints)
            name, sha = parse_key(state["merged_adapter"]) if state["merged_adapter"] else (None, None)
            policy = dict(state["merge_policy"])
            policy["recent_shares"] = {short_key(k): v for k, v in policy.get("recent_shares", {}).items()}
            policy["refused"] = [short_key(k) for k in policy.get("refused", [])]
            return {**state, "replica": self.replica_id, "merged_adapter": name, "merged_sha256": sha,
                    "merge_policy": policy, "resident_adapters": [short_key(k) for k in state["resident_adapters"]],
                    "host_cached_adapters": [short_key(k) for k in state["host_cached_adapters"]],
                    "cold_loads": self._count("device"), "disk_loads": self._count("disk"),
                    "requests_served": self.served, "pid": os.getpid(),
                    "busiest_adapters": {short_key(k): n for k, n in self.by_adapter.most_common(5)},
                    "uptime_s": round(time.time() - self.started_at, 1)}

    return LoraReplica
