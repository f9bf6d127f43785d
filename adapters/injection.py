"""Which modules get LoRA, and swapping them in and out of a module tree.

Target rules follow PEFT's: a list entry matches a module whose name equals it or ends with
".<entry>"; a string is a regex that must match the whole name; "all-linear" takes every Linear/Conv1D
except the model's output layer (and any module listed in modules_to_save). Layers that a resident
adapter already wrapped count as their original Linear, and their insides are never targets. Ejecting puts the very
same original module objects back, so the tree is exactly what it was before injection.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from adapters.config import ALL_LINEAR
from adapters.errors import TargetNotFoundError
from adapters.layer import LoraLinear, is_lora_target_type
from adapters.saved_modules import SavedModuleWrapper

__all__ = ["matches_target", "resolve_targets", "set_submodule", "output_layer_names"]


def matches_target(name: str, targets: list[str] | str) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def output_layer_names(model: nn.Module) -> set[str]:
    """Names of the output projection(s) ("lm_head"), which all-linear leaves alone as PEFT does."""
    names = {"lm_head"}
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    if out is not None:
        names |= {n for n, m in model.named_modules() if m is out}
    return names


def resolve_targets(
    model: nn.Module,
    targets: list[str] | str,
    *,
    exclude: list[str] | str | None = None,
    modules_to_save: Iterable[str] = (),
) -> list[str]:
    """Module names to wrap. Raises TargetNotFoundError naming the targets if nothing matches."""
    saved = list(modules_to_save)
    skip = output_layer_names(model) if targets == ALL_LINEAR else set()
    found: list[str] = []
    unsupported: list[str] = []
    wrapped: list[str] = []  # layers another resident adapter already wrapped: their insides are ours
    for name, module in model.named_modules():
        if any(name.startswith(w + ".") for w in wrapped):
            continue
        if isinstance(module, (LoraLinear, SavedModuleWrapper)):
            wrapped.append(name)
        if not name or name in skip or any(_within(name, s) for s in saved):
            continue
        if exclude and matches_target(name, exclude):
            continue
        wrappable = is_lora_target_type(module) or isinstance(module, LoraLinear)
        if targets == ALL_LINEAR:
            if wrappable:
                found.append(name)
        elif matches_target(name, targets):
            if wrappable:
                found.append(name)
            else:  # a leaf such as an Embedding, or a container such as BertAttention: PEFT refuses both
                unsupported.append(f"{name} ({type(module).__name__})")
    if unsupported:
        raise TargetNotFoundError(
            f"target_modules {targets!r} match modules LoRA cannot wrap (only Linear and Conv1D): "
            f"{', '.join(unsupported[:5])}",
            field="target_modules",
        )
    if not found:
        raise TargetNotFoundError(f"target_modules {targets!r} match no Linear/Conv1D module of the model",
                                  field="target_modules")
    return found


def _within(name: str, saved: str) -> bool:
    """`name` is the module `saved` names (PEFT's suffix rule) or inside it: a head saved whole (RoBERTa's
    `classifier` holds `dense` and `out_proj`) takes no LoRA anywhere in it."""
    return re.fullmatch(rf"(.*\.)?{re.escape(saved)}(\..*)?", name) is not None


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
