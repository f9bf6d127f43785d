"""Which resident adapter leaves the device first: by recent use counts (default), or least recently used.

With more adapters than device slots, LRU keeps whatever was asked for last, so every rarely used adapter that
comes by pushes out a frequently used one, which then comes back cold. Counting uses instead keeps the
adapters that most requests need (the "frequency" order): a rare adapter is loaded for its request and is the
first to go again, while the popular ones stay. Counts are halved every `period` uses (TinyLFU's reset,
Einziger et al. 2017), so that an adapter that was popular an hour ago does not hold a slot forever, and keys
no longer used fade out of the table.

Simulated on the cluster benchmark's workload (200 adapters, Zipf s = 1.1, 16 slots): LRU misses 50% of
requests, frequency 36%, the ideal (the 16 most likely always resident) 36%; a period of 32 x the slots was
within 1% of never halving (benchmarks/sim_cold_loads.py).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

__all__ = ["UseCounts", "eviction_order"]


class UseCounts:
    """Requests per adapter key, halved every `period` counted uses."""

    def __init__(self, period: int) -> None:
        self.period = max(1, period)
        self._counts: Counter[str] = Counter()
        self._since_halving = 0

    def add(self, uses: Mapping[str, int]) -> None:
        for key, n in uses.items():
            self._counts[key] += n
            self._since_halving += n
        if self._since_halving >= self.period:
            self._since_halving = 0
            self._counts = Counter({k: c // 2 for k, c in self._counts.items() if c > 1})

    def __getitem__(self, key: str) -> int:
        return self._counts.get(key, 0)

    def __len__(self) -> int:
        return len(self._counts)


def eviction_order(resident: Iterable[str], policy: str, counts: UseCounts) -> list[str]:
    """Resident keys, the first to evict first. `resident` is in LRU order (least recent first); the
    frequency order sorts by count and keeps that order among equal counts (a stable sort)."""
    keys = list(resident)
    return keys if policy == "lru" else sorted(keys, key=counts.__getitem__)
