"""`AdapterRef`: which adapter a request runs with, by content, resolved once when it is submitted.

    model="support"  ──store.resolve (worker thread)──►  AdapterRef("support", version=3, sha256="5442…")
                                                            │
          host cache, device residency, merge policy, merged adapter: keyed by ref.key (the sha256)

A name is only a pointer that another process (a replica, a shared store) may move at any time, so nothing
on the engine's side is keyed by it: a request carries its ref, and the weights it runs with are exactly
those of ref.sha256. An overwrite under the same name is a new sha256, hence a new cache entry, never the
stale one (engine.forget() only frees memory sooner and moves a pinned merge to the new version). Like
vLLM's LoRARequest, identity travels in one small value object, not as loose strings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["AdapterRef", "BASE_FINGERPRINT", "system_fingerprint"]

BASE_FINGERPRINT = "base"  # what answered a request for model="base": the base weights alone


@dataclass(frozen=True)
class AdapterRef:
    name: str
    version: int
    sha256: str  # of the canonical stored files: what the weights are

    @property
    def key(self) -> str:
        """The adapter's key in every cache tier and in LoraModel: its content, not its name."""
        return self.sha256

    @classmethod
    def of(cls, record: Any) -> AdapterRef:
        """From a store record (service.storage AdapterRecord, or anything with name, version and sha256)."""
        return cls(str(record.name), int(record.version), str(record.sha256))

    def __str__(self) -> str:
        return system_fingerprint(self)


def system_fingerprint(ref: AdapterRef | None) -> str:
    """OpenAI's `system_fingerprint`: which weights answered, e.g. "support@v3:5442a1b2c3d4"; "base" for none."""
    return BASE_FINGERPRINT if ref is None else f"{ref.name}@v{ref.version}:{ref.sha256[:12]}"
