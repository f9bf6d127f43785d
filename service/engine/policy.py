"""When to serve merged, with hysteresis.

S-LoRA measured that merging wins with one hot adapter and loses beyond two; dLoRA switches between
the modes at run time. `auto` watches the adapters of the last `window` requests (by key: the engine passes
each adapter's sha256, so a new version of a name starts with no history):

  * unmerged → merge X   when X's share ≥ `enter` (default 0.9) of a full window;
  * merged X → unmerge   when X's share < `leave` (default 0.6);
  * and never changes mode twice within `min_dwell` batches, so alternating traffic cannot thrash.

While X is merged, requests for other adapters are still served exactly (the layer subtracts X's
branch for their rows), so a wrong guess costs speed, never correctness. `never` keeps the weights
unmerged, `always` merges the adapter of each group before running it. An explicit merge request pins
its adapter until an explicit unmerge, whatever the policy.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Iterable

__all__ = ["MergePolicy", "POLICIES"]

POLICIES = ("never", "always", "auto")


class MergePolicy:
    def __init__(self, mode: str = "auto", *, window: int = 64, enter: float = 0.9, leave: float = 0.6,
                 min_dwell: int = 8) -> None:
        if mode not in POLICIES:
            raise ValueError(f"merge policy must be one of {POLICIES}, got {mode!r}")
        if not 0 < leave < enter <= 1:
            raise ValueError("need 0 < leave < enter <= 1 for hysteresis")
        self.mode, self.enter, self.leave, self.min_dwell = mode, enter, leave, min_dwell
        self.recent: deque[str | None] = deque(maxlen=window)
        self.batches_since_change = min_dwell
        self.switches = 0
        self.refused: set[str] = set()  # adapters a merge refused (tied or overflowing weights): never retried

    def forget(self, name: str) -> None:
        """A deleted or replaced adapter (its key): its past requests no longer count."""
        self.recent = deque((a for a in self.recent if a != name), maxlen=self.recent.maxlen)
        self.refused.discard(name)

    def refuse(self, name: str | None) -> None:
        if name is not None:
            self.refused.add(name)

    def observe(self, adapters: Iterable[str | None]) -> None:
        self.recent.extend(adapters)
        self.batches_since_change += 1

    def shares(self, label: Callable[[str], str] = str) -> dict[str, float]:
        n = len(self.recent) or 1
        return {("base" if k is None else label(k)): v / n for k, v in Counter(self.recent).most_common(5)}

    def decide(self, merged: str | None, pinned: bool) -> tuple[bool, str | None]:
        """(change?, adapter to merge or None to unmerge) for the auto policy."""
        if self.mode != "auto" or pinned or self.batches_since_change < self.min_dwell:
            return False, merged
        if len(self.recent) < (self.recent.maxlen or 0):
            return False, merged
        counts = Counter(a for a in self.recent if a not in self.refused)
        if not counts:
            return False, merged
        top, count = counts.most_common(1)[0]
        share = count / len(self.recent)
        if merged is None:
            if top is not None and share >= self.enter:
                return self._changed(top)
            return False, None
        merged_share = sum(1 for a in self.recent if a == merged) / len(self.recent)
        if merged_share < self.leave:
            return self._changed(top if top is not None and share >= self.enter else None)
        return False, merged

    def _changed(self, target: str | None) -> tuple[bool, str | None]:
        self.batches_since_change = 0
        self.switches += 1
        return True, target

    def describe(self, label: Callable[[str], str] = str) -> dict:
        """`label` names an adapter key for people (the engine keys adapters by sha256: identity.py)."""
        return {"policy": self.mode, "enter_share": self.enter, "leave_share": self.leave,
                "min_dwell_batches": self.min_dwell, "window": self.recent.maxlen,
                "recent_shares": self.shares(label), "auto_switches": self.switches,
                "refused": sorted(label(k) for k in self.refused)}
