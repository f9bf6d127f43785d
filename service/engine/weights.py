"""`WeightOwner`: the one owner of the model's weights. Nothing else adds, removes, merges or unmerges.

    Engine (engine.py) ──► Scheduler (scheduler.py, the loop thread) ──► WeightOwner (this file)
                                                                          ├─ LoraModel: the base + resident adapters
                                                                          ├─ AdapterTiers: host RAM / device residency
                                                                          ├─ MergePolicy, the pin
                                                                          └─ the lock

Everything that writes weights (adapters in and out of residency, merge, unmerge, switch, the re-pin after an
overwrite) is a method here, run on the loop thread under `lock`; the Scheduler holds the same lock around each
forward, so a forward never sees half-merged weights. The one other holder of the lock is the fingerprint hash
(`fingerprinted_state`, a worker thread), which reads every targeted base weight through LoraModel's public
read-back (fingerprint.py). Adapters are keyed by content (`AdapterRef.key`, the sha256): the merged adapter,
residency, the host cache and the policy's memory, so a request runs with exactly the version it resolved;
names appear only in what /v1/state shows.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from typing import Any, Protocol

from adapters import LoraModel, LoraWeights, MergeError, validate_adapter
from adapters.merge_kernel import kernel_name
from adapters.validation import model_index
from service.base_model import LoadedBase
from service.engine.cache import HostCache
from service.engine.config import EngineConfig
from service.engine.fingerprint import fingerprint
from service.engine.identity import AdapterRef
from service.engine.policy import MergePolicy
from service.engine.tiers import AdapterTiers

__all__ = ["MAX_DELTA", "BaseValidator", "WeightOwner"]

# The largest |s·B·A| entry an uploaded adapter may add to a weight. Trained deltas are small next to the
# weights (well under 1); one of 10^4 can only overflow activations, or wreck the model, so it is refused.
MAX_DELTA = 1e4
log = logging.getLogger(__name__)


class _Work(Protocol):  # a WorkItem or a budget.Part: what residency and the policy read of a request
    ref: AdapterRef | None
    preloaded: LoraWeights | None

    @property
    def key(self) -> str | None: ...

    def fail(self, exc: BaseException) -> None: ...


class BaseValidator:
    """Full validation of an adapter against the bare base (every key, shape, rank, finite values, the delta
    bound), callable from any thread: it reads a snapshot of the base's module tree, taken once, since the loop
    thread may be wrapping layers meanwhile. Conflicts with the adapters resident at the time are checked when
    one is added, on the loop thread."""

    def __init__(self, base: LoadedBase, max_rank: int) -> None:
        self.base, self.max_rank = base, max_rank
        self.index = model_index(base.model)

    def __call__(self, weights: LoraWeights) -> LoraWeights:
        return validate_adapter(self.base.model, weights, max_rank=self.max_rank,
                                allow_detached=self.base.task != "classify", max_delta=MAX_DELTA, index=self.index)


class WeightOwner:
    def __init__(self, base: LoadedBase, config: EngineConfig, store: Any, metrics: Any = None) -> None:
        self.base, self.config, self.metrics = base, config, metrics
        self.validate = BaseValidator(base, config.max_rank)  # any thread
        self.lm = LoraModel(base.model, max_rank=config.max_rank, fused_merges=config.merge_kernel == "auto")
        self.lock = threading.RLock()
        self.tiers = AdapterTiers(self.lm, base, config, store, self.validate, metrics)
        self.policy = MergePolicy(config.merge_policy, window=config.merge_window, min_dwell=config.merge_min_dwell)
        self.pinned = False
        self._names: dict[str, str] = {}  # sha256 -> the name it was last asked for by: labels for /v1/state
        self._pristine_fingerprint: str | None = None  # of W0, which never changes: hashed on the first request

    # ------------------------------------------------------------------ any thread
    @property
    def host(self) -> HostCache:
        return self.tiers.host

    def load(self, ref: AdapterRef) -> LoraWeights:
        """Worker thread: the validated weights of exactly `ref` (host cache, else the store by its record)."""
        return self.tiers.load(ref)

    def is_resident(self, ref: AdapterRef) -> bool:
        return ref.key in self.tiers.resident

    def held(self, ref: AdapterRef) -> str | None:
        """Where a copy of exactly `ref` is held: "device", "host" or None (any thread; for serving while the
        index cannot say what the name points at now)."""
        if ref.key in self.tiers.resident:
            return "device"
        return "host" if self.host.get(ref.key) is not None else None

    @property
    def merged(self) -> AdapterRef | None:
        key = self.lm.merged_adapter
        return None if key is None else self.tiers.resident[key][0]

    # ------------------------------------------------------------------ loop thread: residency
    def make_resident(self, items: list[_Work], protect: set[str]) -> list[_Work]:
        """Every adapter of the batch resident at once (so loading one cannot evict another the batch needs); a
        request whose adapter cannot be loaded fails alone, the rest runs. `protect`: keys running rows use."""
        refs: dict[str, tuple[AdapterRef, LoraWeights | None]] = {}
        for item in items:  # any batch-mate's copy will do: the same key is the same bytes
            if item.ref is not None and refs.get(item.ref.key, (None, None))[1] is None:
                refs[item.ref.key] = (item.ref, item.preloaded)
        failed: dict[str, Exception] = {}
        with self.lock:
            self.tiers.count_uses(Counter(item.ref.key for item in items if item.ref is not None))
            for key, (ref, preloaded) in refs.items():
                self._names[key] = ref.name
                try:
                    self.tiers.add_resident(ref, preloaded)
                except Exception as exc:  # noqa: BLE001 - that request's failure, not the batch's
                    failed[key] = exc
            self.tiers.trim(protect=set(refs) | protect)
            self._forget_labels()
        for item in items:
            if item.key in failed:
                item.fail(failed[item.key])
        return [i for i in items if i.key not in failed]

    def _forget_labels(self) -> None:
        """Keep a label only for a key that is resident or in the merge policy's window (what /v1/state shows),
        so that serving many adapters over time does not grow the map without bound."""
        if len(self._names) > 2 * (len(self.tiers.resident) + (self.policy.recent.maxlen or 0)):
            shown = set(self.tiers.resident) | set(self.policy.recent)
            self._names = {k: v for k, v in self._names.items() if k in shown}

    def trim(self, protect: set[str]) -> None:
        with self.lock:
            self.tiers.trim(protect=protect)

    def evict(self, name: str, *, keep_merged: bool = False) -> None:
        """Every resident version of `name` off the device (a merged one is unmerged first, unless
        `keep_merged`): after a delete or an overwrite, to free memory sooner."""
        with self.lock:
            for key in self.tiers.keys_named(name):
                if key == self.lm.merged_adapter:
                    if keep_merged:
                        continue
                    self._set_merged(None, "unmerge")
                    self.pinned = False
                self.tiers.remove(key)
                self.policy.forget(key)  # its past traffic must not make `auto` merge it

    # ------------------------------------------------------------------ loop thread: merge
    def merge(self, ref: AdapterRef, preloaded: LoraWeights | None, protect: set[str]) -> dict:
        """Merge `ref` and pin it; answers the state right after (without fingerprints)."""
        with self.lock:  # the pin changes with the weights: a state read under the lock sees both or neither
            kind = "switch" if self.lm.merged_adapter not in (None, ref.key) else "merge"
            self._set_merged(ref, kind, protect=protect, preloaded=preloaded)
            self.pinned = True
            return self.snapshot()

    def unmerge(self) -> dict:
        with self.lock:
            self._set_merged(None, "unmerge")
            self.pinned = False
            return self.snapshot()

    def repin(self, name: str, ref: AdapterRef | None, preloaded: LoraWeights | None, protect: set[str]) -> None:
        """After an overwrite of `name`, whose older version was pinned merged: the new version `ref` takes its
        place, still pinned (None: the name is gone, so unmerge). Old versions of `name` then leave the device."""
        with self.lock:
            merged = self.merged
            if self.pinned and merged is not None and merged.name == name and ref is not None:
                try:
                    self._set_merged(ref, "switch" if ref.key != merged.key else "merge", protect=protect,
                                     preloaded=preloaded)
                except Exception as exc:  # noqa: BLE001 - e.g. the new version cannot merge: served unmerged
                    log.warning("the new version of pinned adapter %r could not be merged (%s); unpinned", name, exc)
                    self._set_merged(None, "unmerge")
                    self.pinned = False
            for key in self.tiers.keys_named(name):
                if ref is None or key != ref.key:
                    if key == self.lm.merged_adapter:
                        self._set_merged(None, "unmerge")
                        self.pinned = False
                    self.tiers.remove(key)

    def apply_policy(self, items: list[_Work], protect: set[str]) -> None:
        """Merge or unmerge as the policy says. Advisory: a merge that fails leaves the batch to run unmerged
        (exact either way); only adapters the batch names or that are resident are merged."""
        keys = [i.key for i in items]
        refs = {i.ref.key: i.ref for i in items if i.ref is not None}
        merged = self.lm.merged_adapter
        if self.policy.mode == "always" and not self.pinned:
            target = keys[0]
            change = merged != target and target not in self.policy.refused
        else:
            self.policy.observe(keys)
            change, target = self.policy.decide(merged, self.pinned)
        if not change or (target is not None and target not in refs and target not in self.tiers.resident):
            return
        ref = None if target is None else refs.get(target) or self.tiers.resident[target][0]
        kind = "unmerge" if ref is None else ("switch" if merged else "merge")
        try:
            with self.lock:
                self._set_merged(ref, kind, protect=set(refs) | protect)
        except Exception as exc:  # noqa: BLE001 - never fail the batch for the policy's sake
            if isinstance(exc, MergeError):  # tied or overflowing weights: it will never merge
                self.policy.refuse(target)
            log.warning("%s merge policy: not merging %s (%s); serving unmerged", self.policy.mode, ref, exc)

    def _set_merged(self, ref: AdapterRef | None, kind: str, *, protect: set[str] = frozenset(),
                    preloaded: LoraWeights | None = None) -> None:
        """Merge `ref` (None: unmerge), keeping `protect` (keys the running batch uses) resident."""
        with self.lock:
            if ref is None:
                self.lm.unmerge()
            else:
                self._names[ref.key] = ref.name
                self.tiers.add_resident(ref, preloaded)
                self.tiers.trim(protect=set(protect) | {ref.key})
                self.lm.merge(ref.key)
        if self.metrics is not None:
            self.metrics.merges.labels(kind=kind).inc()
            self.metrics.merge_mode.set(0 if ref is None else 1)

    # ------------------------------------------------------------------ state
    def snapshot(self) -> dict:
        """The merge state, by name as clients know adapters; `resident` adds each version and sha256."""
        with self.lock:
            merged = self.merged
            residents = [ref for ref, _ in self.tiers.resident.values()]
            return {
                "merged_adapter": None if merged is None else merged.name,
                "merged": None if merged is None else _ref_dict(merged),
                "pinned": self.pinned,
                "mode": "merged" if merged else "unmerged",
                "merge_policy": self.policy.describe(label=lambda k: self._names.get(k, k)),
                "resident_adapters": list(dict.fromkeys(ref.name for ref in residents)),
                "resident": [_ref_dict(ref) for ref in residents],
                "host_cached_adapters": self.host.names(),
                "host_cache_bytes": self.host.nbytes,
                "pristine_bytes": self.lm.pristine_nbytes(),
                "merge_kernel": kernel_name(self.base.device, self.base.dtype, fused=self.lm.fused_merges),
                "fingerprint": None,
                "pristine_fingerprint": None,
            }

    def fingerprinted_state(self) -> dict:
        """Worker thread, never the loop thread: the lock is held just for the state and the hashes, so the
        weights cannot change mid-hash and the state matches them; batches wait for the hash, and a merge
        or unmerge waits only when it arrives during one."""
        with self.lock:
            state = self.snapshot()
            if self._pristine_fingerprint is None:  # under the lock: concurrent first requests hash it once
                self._pristine_fingerprint = fingerprint(self.lm, pristine=True)
            state.update(fingerprint=fingerprint(self.lm), pristine_fingerprint=self._pristine_fingerprint)
        return state


def _ref_dict(ref: AdapterRef) -> dict:
    return {"name": ref.name, "version": ref.version, "sha256": ref.sha256}
