"""The middle tier of the adapter cache: validated adapters in host RAM, LRU, bounded in bytes.

    store (disk, durable)  →  HostCache (RAM, LRU by bytes)  →  resident on the device (LoraModel)

Entries are keyed by name and checked against the store's sha256, so an overwritten adapter is never
served stale. The tiers together are in tiers.py.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from adapters import LoraWeights

__all__ = ["HostCache"]


class HostCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple[str, LoraWeights, int]] = OrderedDict()  # name -> (sha, w, bytes)
        self._bytes = 0
        self._lock = threading.Lock()  # touched by loader threads and the loop thread

    def get(self, name: str, sha256: str | None = None) -> LoraWeights | None:
        with self._lock:
            entry = self._entries.get(name)
            if entry is None or (sha256 is not None and entry[0] != sha256):
                return None
            self._entries.move_to_end(name)
            return entry[1]

    def peek(self, name: str) -> tuple[str, LoraWeights] | None:
        """(sha256, weights) of whatever version is held for `name`, unchecked: for when the index is unreachable."""
        with self._lock:
            entry = self._entries.get(name)
            return None if entry is None else (entry[0], entry[1])

    def put(self, name: str, sha256: str, weights: LoraWeights) -> None:
        size = weights.nbytes()
        with self._lock:
            self._pop_locked(name)
            if size > self.max_bytes:
                return  # larger than the whole tier: served from disk each time it goes cold
            self._entries[name] = (sha256, weights, size)
            self._bytes += size
            while self._bytes > self.max_bytes:
                self._pop_locked(next(iter(self._entries)))

    def pop(self, name: str) -> None:
        with self._lock:
            self._pop_locked(name)

    def _pop_locked(self, name: str) -> None:
        entry = self._entries.pop(name, None)
        if entry is not None:
            self._bytes -= entry[2]

    @property
    def nbytes(self) -> int:
        return self._bytes

    def names(self) -> list[str]:
        with self._lock:
            return list(self._entries)
