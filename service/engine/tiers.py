"""The adapter cache tiers: the store on disk, validated adapters in host RAM, adapters resident on the device.

    store (durable)  ──load + validate──►  HostCache (RAM, LRU by bytes)  ──add──►  resident (LoraModel, LRU)
                        any thread                                                   loop thread only

`check` and `load` may run in worker threads (the host tier has its own lock); `add_resident`, `trim` and
`remove` change the model, so only the engine's loop thread calls them, under the engine lock. Every tier
is keyed by name and checked against the sha256 the index gives now, once per request (`check`), so an
adapter overwritten through another server sharing the store is not served stale; the bytes are read by
that record's sha256 (`store.load_weights(record)`), so a request gets exactly the version it resolved.

When the index cannot be reached (StorageUnavailableError), a copy this server holds (resident, or in host
RAM) is served as the last version it resolved, rather than failing the request; an adapter it does not
hold answers 503. That copy is stale only if another server, still able to reach the index, replaced or
deleted the adapter meanwhile; it is rechecked on the first request after the index is back.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from adapters import LoraModel, LoraWeights, UnknownAdapterError
from service.base_model import LoadedBase
from service.engine.cache import HostCache
from service.storage.interfaces import StorageUnavailableError

__all__ = ["AdapterTiers"]


class AdapterTiers:
    def __init__(self, lm: LoraModel, base: LoadedBase, settings: Any, store: Any,
                 validate: Callable[[LoraWeights], LoraWeights], count: Callable[[str, str], None]) -> None:
        self.lm, self.base, self.settings, self.store = lm, base, settings, store
        self._validate, self._count = validate, count
        self.host = HostCache(settings.host_cache_bytes)
        self.resident: OrderedDict[str, tuple[str, int]] = OrderedDict()  # name -> (sha256, bytes), LRU order

    def check(self, name: str) -> tuple[str, LoraWeights] | None:
        """Worker thread, once per request: None if the resident copy of `name` is the stored version (or the
        index is unreachable and it is resident: served as the last version resolved), else (sha256, weights)
        of the stored version for the loop thread to make resident."""
        try:
            record = self._resolve(name)
        except StorageUnavailableError:
            if name in self.resident:
                self._count("stale_served", "device")
                return None
            held = self.host.peek(name)
            if held is None:
                raise
            self._count("stale_served", "host")
            return held
        resident = self.resident.get(name)
        if resident is not None and resident[0] == record.sha256:
            return None
        return self.load(name, record=record)

    def load(self, name: str, preloaded: tuple[str, LoraWeights] | None = None,
             record: Any = None) -> tuple[str, LoraWeights]:
        """(sha256, validated weights in the base's dtype): from host RAM, or the copy a request loaded off
        the loop thread (`preloaded`) if it is still the stored version, or else from the store, by the
        sha256 of `record` (looked up now unless given)."""
        if record is None:
            try:
                record = self._resolve(name)
            except StorageUnavailableError:
                if preloaded is None:
                    raise
                return preloaded  # the index went away since the request resolved it: that version
        cached = self.host.get(name, record.sha256)
        if cached is not None:
            self._count("cache_hits", "host")
            return record.sha256, cached
        if preloaded is not None and preloaded[0] == record.sha256:
            return preloaded
        self._count("cache_misses", "host")
        weights = self._validate(self.store.load_weights(record)).to(dtype=self.base.dtype)
        self.host.put(name, record.sha256, weights)
        self._count("adapter_loads", "disk")
        return record.sha256, weights

    def _resolve(self, name: str) -> Any:
        try:
            return self.store.get(name)
        except LookupError as exc:
            raise UnknownAdapterError(f"adapter {name!r} not found", key=name) from exc

    def add_resident(self, name: str, preloaded: tuple[str, LoraWeights] | None = None) -> None:
        """Loop thread: make `name` resident on the device (most recently used either way)."""
        if name in self.resident:
            self.resident.move_to_end(name)
            self._count("cache_hits", "device")
            return
        self._count("cache_misses", "device")
        sha, weights = self.load(name, preloaded)
        self.lm.add_adapter(name, weights.to(self.base.device), validate=False)
        self.resident[name] = (sha, weights.nbytes())
        self._count("adapter_loads", "device")

    def trim(self, protect: set[str]) -> None:
        """Loop thread: evict least recently used adapters until the device bounds hold, never one in
        `protect` (the running batch's) nor the merged one."""
        max_n, max_bytes = self.settings.device_cache_adapters, self.settings.device_cache_bytes
        for victim in list(self.resident):
            if len(self.resident) <= max_n and sum(b for _, b in self.resident.values()) <= max_bytes:
                break
            if victim not in protect and victim != self.lm.merged_adapter:
                self.remove(victim)

    def remove(self, name: str) -> None:
        """Loop thread: take `name` off the device (the caller unmerges it first if it is merged)."""
        if name in self.resident:
            self.lm.remove_adapter(name)
            del self.resident[name]
