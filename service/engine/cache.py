"""The middle tier of the adapter cache: validated adapters in host RAM, LRU, bounded in bytes.

    store (disk, durable)  →  HostCache (RAM, LRU by bytes)  →  resident on the device (LoraModel)

Entries are keyed by the adapter's sha256 (identity.py), so an overwritten adapter is a new key and the old
entry can never be served for it; two names whose stored files are identical share one entry. Each entry
remembers the names it was loaded for, for /v1/state and so that `pop(name)` (engine.forget) can free it
early. The tiers together are in tiers.py.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from adapters import LoraWeights

__all__ = ["HostCache"]


class HostCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        # sha256 -> (weights, bytes, names it was loaded for), least recently used first
        self._entries: OrderedDict[str, tuple[LoraWeights, int, list[str]]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()  # touched by loader threads and the loop thread

    def get(self, sha256: str, name: str | None = None) -> LoraWeights | None:
        with self._lock:
            entry = self._entries.get(sha256)
            if entry is None:
                return None
            if name is not None and name not in entry[2]:
                entry[2].append(name)
            self._entries.move_to_end(sha256)
            return entry[0]

    def put(self, sha256: str, weights: LoraWeights, name: str | None = None) -> None:
        size = weights.nbytes()
        with self._lock:
            names = self._pop_locked(sha256)
            if size > self.max_bytes:
                return  # larger than the whole tier: served from disk each time it goes cold
            if name is not None and name not in names:
                names.append(name)
            self._entries[sha256] = (weights, size, names)
            self._bytes += size
            while self._bytes > self.max_bytes:
                self._pop_locked(next(iter(self._entries)))

    def pop(self, key: str) -> None:
        """Drop the entry of this sha256, or every entry loaded for this name (a deleted or replaced adapter:
        its memory back sooner; correctness never depends on it, since entries are keyed by content)."""
        with self._lock:
            if key in self._entries:
                self._pop_locked(key)
                return
            for sha, (_, _, names) in list(self._entries.items()):
                if key in names:
                    names.remove(key)
                    if not names:
                        self._pop_locked(sha)

    def _pop_locked(self, sha256: str) -> list[str]:
        entry = self._entries.pop(sha256, None)
        if entry is None:
            return []
        self._bytes -= entry[1]
        return entry[2]

    @property
    def nbytes(self) -> int:
        return self._bytes

    def names(self) -> list[str]:
        """The names of the cached entries, least recently used first (each once)."""
        with self._lock:
            return list(dict.fromkeys(n for _, _, names in self._entries.values() for n in names))

    def __contains__(self, sha256: str) -> bool:
        with self._lock:
            return sha256 in self._entries
