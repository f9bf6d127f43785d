"""`EngineConfig`: what the engine reads from the service's Settings, typed, in one place.

    Settings (pydantic, every flag and LORA_* variable)  ──from_settings──►  EngineConfig (frozen)  ──►  Engine

The engine never reads Settings itself, so a field it needs is either here (and read from Settings by
`from_settings`, which names every field: tests/service/engine/test_config.py checks that) or it does not
exist; there are no getattr defaults.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = ["EngineConfig"]


@dataclass(frozen=True)
class EngineConfig:
    max_rank: int = 64  # larger adapters are refused at validation
    max_batch_size: int = 32  # requests per forward; rows in the running decode
    max_wait_ms: float = 5.0  # how long the first request of a batch waits for others
    max_batch_tokens: int | None = None  # padded tokens per forward; None: budget.default_budget(device)
    overtake_tokens: int | None = None  # padded tokens that may overtake a forward (overtake.py); None: 1/4 of
    # max_batch_tokens, 0: never
    merge_policy: str = "auto"  # never | always | auto (policy.py)
    merge_window: int = 64  # auto: recent requests watched
    merge_min_dwell: int = 8  # auto: fewest batches between two mode changes
    merge_kernel: str = "auto"  # auto: the fused C kernel where built; addmm: torch.addmm
    host_cache_bytes: int = 512 << 20  # host-RAM tier of validated adapters (cache.py)
    device_cache_adapters: int = 32  # device tier, by count...
    device_cache_bytes: int = 256 << 20  # ...and by bytes (tiers.py)
    device_cache_eviction: str = "frequency"  # frequency | lru: which resident adapter goes first (eviction.py)

    @classmethod
    def from_settings(cls, settings: Any) -> EngineConfig:
        """Every field from the service's Settings (service/settings.py), by name: a field missing there is an
        AttributeError at start-up, not a silent default."""
        return cls(
            max_rank=int(settings.max_rank),
            max_batch_size=int(settings.max_batch_size),
            max_wait_ms=float(settings.max_wait_ms),
            max_batch_tokens=None if settings.max_batch_tokens is None else int(settings.max_batch_tokens),
            overtake_tokens=None if settings.overtake_tokens is None else int(settings.overtake_tokens),
            merge_policy=str(settings.merge_policy),
            merge_window=int(settings.merge_window),
            merge_min_dwell=int(settings.merge_min_dwell),
            merge_kernel=str(settings.merge_kernel),
            host_cache_bytes=int(settings.host_cache_bytes),
            device_cache_adapters=int(settings.device_cache_adapters),
            device_cache_bytes=int(settings.device_cache_bytes),
            device_cache_eviction=str(settings.device_cache_eviction),
        )

    def replace(self, **changes: Any) -> EngineConfig:
        return dataclasses.replace(self, **changes)
