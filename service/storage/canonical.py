"""An adapter in its stored form: the canonical PEFT bytes and their digest, made once per upload.

    LoraWeights ──canonicalize──► CanonicalAdapter(config_bytes, model_bytes, sha256, rank, targets, ...)
                                        │
                                        └── AdapterStore.put(name, adapter)  (no tensors below this line)

The bytes are `adapters.to_peft_bytes`: the config rewritten as sorted JSON with only the fields PEFT and this
service use, the tensors as safetensors with any label names in its `__metadata__`. So the same adapter uploaded
as two PEFT files or as one single file has one digest and is stored once, and one relabelled is a new blob.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from adapters import LoraWeights, to_peft_bytes
from adapters.serialization import CONFIG_NAME, WEIGHTS_NAME

__all__ = ["CanonicalAdapter", "canonicalize", "adapter_digest", "FILENAMES"]

FILENAMES = (CONFIG_NAME, WEIGHTS_NAME)


def adapter_digest(config_bytes: bytes, model_bytes: bytes) -> str:
    """sha256 over the canonical config (length-prefixed) followed by the canonical weights."""
    h = hashlib.sha256(len(config_bytes).to_bytes(8, "little"))
    h.update(config_bytes)
    h.update(model_bytes)
    return h.hexdigest()


@dataclass(frozen=True)
class CanonicalAdapter:
    config_bytes: bytes
    model_bytes: bytes
    sha256: str  # adapter_digest(config_bytes, model_bytes)
    rank: int  # the largest rank of any module
    targets: list[str]
    num_parameters: int
    task_type: str | None

    @property
    def nbytes(self) -> int:
        return len(self.config_bytes) + len(self.model_bytes)

    def files(self) -> dict[str, bytes]:
        return {CONFIG_NAME: self.config_bytes, WEIGHTS_NAME: self.model_bytes}


def canonicalize(weights: LoraWeights) -> CanonicalAdapter:
    """Serialize and hash once; call it on weights that were already validated against the base."""
    config_bytes, model_bytes = to_peft_bytes(weights)
    return CanonicalAdapter(config_bytes, model_bytes, adapter_digest(config_bytes, model_bytes), weights.max_rank(),
                            weights.targets(), weights.num_parameters(), weights.config.task_type)
