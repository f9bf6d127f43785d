"""sha256 over every base weight a merge can change: the weight of each Linear/Conv1D of the base.

`pristine=True` hashes W0 (the snapshot a merge takes, where a wrapped layer has one), so the two
fingerprints are equal exactly when nothing is merged (and after any unmerge, since restores are bit-exact).
The wrapped layers' weights come from `LoraModel`'s public read-back (`merge_target_weights()`,
`pristine_weights()`); the layers no adapter wraps are read from the module tree as they are.

Reading ~340 MB (all-linear GPT-2 small) takes a while, so the engine runs this in a worker thread, under its
lock, and only when a client asks (`GET /v1/state?fingerprints=true`); hashlib drops the GIL while it hashes.
"""

from __future__ import annotations

import hashlib

import torch

from adapters import LoraModel
from adapters.layer import is_lora_target_type

__all__ = ["fingerprint"]


def fingerprint(lm: LoraModel, *, pristine: bool = False) -> str:
    h = hashlib.sha256()
    wrapped = lm.pristine_weights() if pristine else lm.merge_target_weights()  # by path in the live tree
    inside = None  # the prefix of the wrapped layer being skipped: its lora_A/lora_B/base_layer are not base weights
    for name, module in lm.model.named_modules():  # pre-order: a wrapper's children follow it, contiguously
        if inside is not None and name.startswith(inside):
            continue
        if name in wrapped:
            inside, weight = name + ".", wrapped[name]
        elif is_lora_target_type(module):
            weight = module.weight
        else:
            continue
        # Names are those of the bare model, whatever wrappers residency added, so that the fingerprint
        # depends only on the weights' values.
        h.update(name.replace(".original_module", "").encode())
        # Raw bytes, whatever the dtype (bf16 has no numpy equivalent), hashed from a view: no copy on the CPU.
        h.update(memoryview(weight.detach().to("cpu").contiguous().view(torch.uint8).reshape(-1).numpy()))
    return h.hexdigest()
