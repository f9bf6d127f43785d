"""The adapter cache tiers: the store, validated adapters in host RAM, adapters resident on the device.

    store (durable)  ──load_weights(record) + validate──►  HostCache (RAM, LRU by bytes)  ──add──►  resident
                        any thread                                                                   (LoraModel)

Every tier is keyed by the adapter's sha256 (an `AdapterRef` resolved when the request was submitted), and
the store is read by that record, so the bytes are that version's whatever the name points at by then: an
overwritten adapter is a new key and is never served stale. `load` may run in worker threads (the host tier
has its own lock); `add_resident`, `trim` and `remove` change the model, so only `WeightOwner` (weights.py)
calls them, on the loop thread, under its lock.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from adapters import LoraModel, LoraWeights, UnknownAdapterError
from service.base_model import LoadedBase
from service.engine.cache import HostCache
from service.engine.config import EngineConfig
from service.engine.errors import AdapterChangedError
from service.engine.eviction import UseCounts, eviction_order
from service.engine.identity import AdapterRef

__all__ = ["AdapterTiers"]


class AdapterTiers:
    def __init__(self, lm: LoraModel, base: LoadedBase, config: EngineConfig, store: Any,
                 validate: Callable[[LoraWeights], LoraWeights], metrics: Any = None) -> None:
        self.lm, self.base, self.config, self.store, self.metrics = lm, base, config, store, metrics
        self._validate = validate
        self.host = HostCache(config.host_cache_bytes)
        self.resident: OrderedDict[str, tuple[AdapterRef, int]] = OrderedDict()  # sha256 -> (ref, bytes), LRU
        self.uses = UseCounts(period=32 * config.device_cache_adapters)  # what `trim` evicts by (eviction.py)

    def load(self, ref: AdapterRef, preloaded: LoraWeights | None = None) -> LoraWeights:
        """Validated weights of exactly `ref` in the base's dtype: the copy a request loaded off the loop thread
        (`preloaded`), else from host RAM, else from the store by its record (sha256-addressed)."""
        if preloaded is not None:
            return preloaded
        cached = self.host.get(ref.key, ref.name)
        if cached is not None:
            self._count("cache_hits", "host")
            return cached
        self._count("cache_misses", "host")
        try:
            raw = self.store.load_weights(ref)
        except (UnknownAdapterError, LookupError) as exc:  # this version's files are gone (deleted, collected)
            raise AdapterChangedError(ref.name, replaced=True, version=ref.version) from exc
        weights = self._validate(raw).to(dtype=self.base.dtype)
        self.host.put(ref.key, weights, ref.name)
        self._count("adapter_loads", "disk")
        return weights

    def add_resident(self, ref: AdapterRef, preloaded: LoraWeights | None = None) -> None:
        """Loop thread: make `ref` resident on the device (most recently used either way)."""
        if ref.key in self.resident:
            self.resident.move_to_end(ref.key)
            self._count("cache_hits", "device")
            return
        self._count("cache_misses", "device")
        weights = self.load(ref, preloaded)
        self.lm.add_adapter(ref.key, weights.to(self.base.device), validate=False)
        self.resident[ref.key] = (ref, weights.nbytes())
        self._count("adapter_loads", "device")

    def count_uses(self, uses: dict[str, int]) -> None:
        """Loop thread: requests per key of a batch, for the frequency eviction order."""
        self.uses.add(uses)

    def trim(self, protect: set[str]) -> None:
        """Loop thread: evict adapters until the device bounds hold, the least used first (or the least recently
        used, `--device-cache-eviction lru`), never one in `protect` (keys of the running batch's adapters) nor
        the merged one."""
        max_n, max_bytes = self.config.device_cache_adapters, self.config.device_cache_bytes
        for victim in eviction_order(self.resident, self.config.device_cache_eviction, self.uses):
            if len(self.resident) <= max_n and sum(b for _, b in self.resident.values()) <= max_bytes:
                break
            if victim not in protect and victim != self.lm.merged_adapter:
                self.remove(victim)

    def remove(self, key: str) -> None:
        """Loop thread: take the adapter of this sha256 off the device (the caller unmerges it first)."""
        if key in self.resident:
            self.lm.remove_adapter(key)
            del self.resident[key]

    def keys_named(self, name: str) -> list[str]:
        """The resident keys loaded for `name` (several versions may be resident at once)."""
        return [key for key, (ref, _) in self.resident.items() if ref.name == name]

    def _count(self, metric: str, tier: str) -> None:
        if self.metrics is not None:
            getattr(self.metrics, metric).labels(tier=tier).inc()
