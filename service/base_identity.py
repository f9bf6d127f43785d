"""Which base model a store belongs to, and the default store directory for a base.

    identity = {"model_id", "architecture", "digest"}   digest: sha256 over the architecture class name and,
                                                        for every Linear/Conv1D (what LoRA can target), its
                                                        name, shape and values

Adapters are validated against one base, so a store records the identity of the base that first opened it
(`index.set_meta_if_absent("base_identity", ...)`) and a server on another base refuses to start on it.
The path is not part of the identity (the same checkpoint copied elsewhere is the same base), and neither
is --dtype: values are rounded to bfloat16 before hashing, so a checkpoint loaded as float32 or bfloat16
has one identity (an fp32 checkpoint loaded as float16 rounds differently, and counts as another base).
Hashing reads every targetable weight once, from the device: a few seconds for a 7B model, run in a
worker thread at start.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from adapters.layer import is_lora_target_type
from service.storage.errors import ForeignStoreError
from service.storage.interfaces import AdapterIndex

__all__ = ["BaseIdentity", "base_identity", "default_store_dir", "claim_store", "IDENTITY_KEY"]

IDENTITY_KEY = "base_identity"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BaseIdentity:
    model_id: str  # for messages only: two copies of one checkpoint under different names are the same base
    architecture: str
    digest: str

    @property
    def short(self) -> str:
        return self.digest[:12]

    def to_json(self) -> str:
        return json.dumps({"model_id": self.model_id, "architecture": self.architecture, "digest": self.digest},
                          sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> BaseIdentity:
        data = json.loads(text)
        return cls(str(data.get("model_id", "?")), str(data.get("architecture", "?")), str(data["digest"]))

    def same_base(self, other: BaseIdentity) -> bool:
        return self.digest == other.digest


@torch.no_grad()
def base_identity(model: nn.Module, model_id: str) -> BaseIdentity:
    h = hashlib.sha256(type(model).__name__.encode())
    for name, module in model.named_modules():
        if not is_lora_target_type(module):
            continue
        weight = module.weight
        h.update(f"\n{name}:{tuple(weight.shape)}\n".encode())
        # One weight at a time onto the CPU, rounded to bfloat16 so that --dtype does not change the identity;
        # viewed as int16 because numpy has no bfloat16.
        h.update(weight.detach().to(torch.bfloat16).cpu().contiguous().view(torch.int16).numpy().tobytes())
    return BaseIdentity(model_id, type(model).__name__, h.hexdigest())


def default_store_dir(identity: BaseIdentity, parent: Path = Path("store")) -> Path:
    """./store/<model-id-slug>-<short digest>: one directory per base, so bases are never mixed by default."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", identity.model_id).strip("-.") or "base"
    return parent / f"{slug[:64]}-{identity.short}"


def claim_store(index: AdapterIndex, identity: BaseIdentity, location: str) -> None:
    """Record `identity` as the store's base if it has none (a new store, or one written before identities);
    raise ForeignStoreError if the store belongs to another base. Changes nothing else either way."""
    existing = index.get_meta(IDENTITY_KEY)
    if existing is None:
        legacy = index.count() > 0
        existing = index.set_meta_if_absent(IDENTITY_KEY, identity.to_json())
        if legacy and existing == identity.to_json():
            log.warning("store %s had no base identity; it now belongs to %s (%s, %s)", location,
                        identity.model_id, identity.architecture, identity.short)
    owner = BaseIdentity.from_json(existing)
    if not owner.same_base(identity):
        raise ForeignStoreError(
            f"store {location} belongs to base model {owner.model_id!r} ({owner.architecture}, identity "
            f"{owner.short}), not to {identity.model_id!r} ({identity.architecture}, identity {identity.short}); "
            f"its adapters were validated against the other base. Start with a fresh store for this base "
            f"(a different --store directory, or leave --store out to get ./store/<model>-<identity>), or "
            f"start on the base the store belongs to. Nothing in the store was changed.")
