"""sha256 over every base weight a merge can change: the weight of each Linear/Conv1D.

`pristine=True` hashes the saved W0 snapshot where a layer has one, so the two fingerprints are equal
exactly when nothing is merged (and after any unmerge, since restores are bit-exact).
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from adapters.layer import LoraLinear, is_lora_target_type

__all__ = ["fingerprint"]


def fingerprint(model: nn.Module, *, pristine: bool = False) -> str:
    h = hashlib.sha256()
    wrapped: list[str] = []  # prefixes of LoraLinear layers: their lora_A/lora_B children are adapters, not base
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in wrapped):
            continue
        if isinstance(module, LoraLinear):
            wrapped.append(name + ".")
            weight = module._pristine if pristine and module._pristine is not None else module.base_layer.weight
        elif is_lora_target_type(module):
            weight = module.weight
        else:
            continue
        # Names are those of the bare model, whatever wrappers residency added, so that the fingerprint
        # depends only on the weights' values.
        h.update(name.replace(".original_module", "").encode())
        # Raw bytes, whatever the dtype (bf16 has no numpy equivalent): view as bytes on the CPU.
        h.update(weight.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
