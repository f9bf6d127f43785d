"""Checks an adapter against a base model before anything touches a weight.

Every LoRA key must name a Linear/Conv1D of the base with matching shapes, the rank must agree with the
config (its scaling depends on it) and stay under the configured maximum, and every value must be a
finite float. Errors name the offending key. Paths saved from a task model (`bert.encoder...`) are
mapped onto a bare encoder (`encoder...`) and back, via the model's `base_model_prefix`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import torch
from torch import nn

from adapters.config import ALL_LINEAR, LoraConfig, exact_pattern
from adapters.errors import AdapterFormatError, AdapterMismatchError, AdapterTooLargeError
from adapters.injection import matches_target
from adapters.layer import LoraLinear, is_lora_target_type, norm_product
from adapters.saved_modules import SavedModuleWrapper
from adapters.weights import PREFIX, LoraWeights

__all__ = ["validate_adapter", "resolve_module_path", "base_weight_shape", "ModelIndex", "model_index"]


class ModelIndex(NamedTuple):
    """The module tree and parameters of a model, by name: what validation reads of it."""

    modules: dict[str, nn.Module]
    params: dict[str, torch.Tensor]


def model_index(model: nn.Module) -> ModelIndex:
    """A snapshot of `model`'s tree. Taken before any adapter is added, it lets other threads validate
    while the owner of the model wraps and unwraps layers (walking the live tree then would race it)."""
    return ModelIndex(dict(model.named_modules()), dict(model.named_parameters(remove_duplicate=False)))


def resolve_module_path(model: nn.Module, path: str, modules: dict[str, nn.Module] | None = None) -> str | None:
    """`path` as a module of `model` (also across a task model's `base_model_prefix`), or None. Paths that
    reach inside one of our wrappers (`….query.base_layer`) are not the base model's: None too."""
    modules = modules if modules is not None else dict(model.named_modules())
    candidates = [path]
    prefix = getattr(model, "base_model_prefix", "") or ""
    if prefix:
        if path.startswith(prefix + "."):
            candidates.append(path[len(prefix) + 1:])
        candidates.append(f"{prefix}.{path}")
    for candidate in candidates:
        if candidate in modules and not _inside_wrapper(candidate, modules):
            return candidate
    return None


def _inside_wrapper(path: str, modules: dict[str, nn.Module]) -> bool:
    parts = path.split(".")
    return any(isinstance(modules.get(".".join(parts[:i])), (LoraLinear, SavedModuleWrapper))
               for i in range(1, len(parts)))


def refuse_lora_on_saved(module: nn.Module | None, path: str) -> None:
    """LoRA on `path` is refused when a resident adapter's modules_to_save replaces that module whole."""
    if isinstance(module, SavedModuleWrapper):
        key = f"{PREFIX}{path}.lora_A.weight"
        raise AdapterMismatchError(f"{key}: module {path!r} is replaced whole by a resident adapter's "
                                   "modules_to_save, so it cannot also take LoRA", key=key)


def refuse_saved_on_lora(module: nn.Module | None, key: str, module_path: str) -> None:
    """modules_to_save tensor `key` is refused when its module carries a resident adapter's LoRA."""
    if isinstance(module, LoraLinear):
        _refuse_saved(PREFIX + key, module_path, "a resident adapter's LoRA")


def _refuse_saved(full_key: str, module_path: str, which: str) -> None:
    raise AdapterMismatchError(f"{full_key}: modules_to_save replaces {module_path!r} whole, which also carries "
                               f"{which}; a module takes one or the other", key=full_key)


def base_weight_shape(module: nn.Module) -> tuple[int, int]:
    """(in, out) of a Linear, Conv1D or an already-wrapped LoraLinear."""
    if isinstance(module, LoraLinear):
        return module.in_features, module.out_features
    w = module.weight
    return (int(w.shape[1]), int(w.shape[0])) if isinstance(module, nn.Linear) else (int(w.shape[0]), int(w.shape[1]))


def _check_values(key: str, t: torch.Tensor, served_dtype: torch.dtype | None = None) -> None:
    """Floating and finite, also once cast to the dtype it is served in (70000 is finite in fp32, not fp16)."""
    if not t.is_floating_point():
        raise AdapterFormatError(f"{key}: dtype {t.dtype} is not floating point", key=key)
    if not bool(torch.isfinite(t).all()):
        raise AdapterMismatchError(f"{key}: holds NaN or infinite values", key=key)
    if served_dtype is not None and served_dtype.is_floating_point and t.numel():
        largest = float(t.detach().abs().max())
        if largest > torch.finfo(served_dtype).max:
            raise AdapterMismatchError(f"{key}: values up to {largest:.3g} overflow the base model's {served_dtype}",
                                       key=key)


def validate_adapter(model: nn.Module, weights: LoraWeights, *, max_rank: int | None = None,
                     allow_detached: bool = False, max_delta: float | None = None,
                     index: ModelIndex | None = None) -> LoraWeights:
    """Returns the weights with module paths resolved against `model`; raises naming the bad key.

    `allow_detached` keeps modules_to_save tensors whose module the model lacks (a classifier head
    served on a bare encoder); otherwise they are an error. `max_delta` bounds the entries of s·B·A
    (checked through |s|·max_i‖B_i‖·max_j‖A_:j‖, which is ≥ every entry, without forming the product).
    `index` (see `model_index`) is read instead of the live tree."""
    index = index if index is not None else model_index(model)
    modules = index.modules
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    pins: dict[str, tuple[str, int]] = {}  # resolved path -> (path as saved, rank)
    sources: dict[str, str] = {}  # resolved path -> path as saved
    for path, (a, b) in weights.lora.items():
        key_a, key_b = f"{PREFIX}{path}.lora_A.weight", f"{PREFIX}{path}.lora_B.weight"
        resolved = resolve_module_path(model, path, modules)
        if resolved is None:
            raise AdapterMismatchError(f"{key_a}: the base model has no module {path!r}", key=key_a)
        module = modules[resolved]
        refuse_lora_on_saved(module, path)
        if not (isinstance(module, LoraLinear) or is_lora_target_type(module)):
            raise AdapterMismatchError(f"{key_a}: module {path!r} is a {type(module).__name__}, not Linear/Conv1D",
                                       key=key_a)
        _check_targeted(weights.config, path, key_a)
        if resolved in lora:
            raise AdapterMismatchError(f"{key_a}: names the same module ({resolved!r}) as "
                                       f"{PREFIX}{sources[resolved]}.lora_A.weight", key=key_a)
        if a.dim() != 2 or b.dim() != 2:
            raise AdapterMismatchError(f"{key_a}: LoRA matrices must be 2-D", key=key_a)
        rank = int(a.shape[0])
        if max_rank is not None and rank > max_rank:
            raise AdapterTooLargeError(f"{key_a}: rank {rank} exceeds the maximum {max_rank}", key=key_a)
        fan_in, fan_out = base_weight_shape(module)
        if tuple(a.shape) != (rank, fan_in):
            raise AdapterMismatchError(f"{key_a}: shape {tuple(a.shape)}, expected ({rank}, {fan_in})", key=key_a)
        if tuple(b.shape) != (fan_out, rank):
            raise AdapterMismatchError(f"{key_b}: shape {tuple(b.shape)}, expected ({fan_out}, {rank})", key=key_b)
        expected_rank = weights.config.rank_for(path)
        if rank != expected_rank:
            raise AdapterMismatchError(
                f"{key_a}: rank {rank} disagrees with the config's r/rank_pattern ({expected_rank})", key=key_a)
        _check_values(key_a, a, module.weight.dtype)
        _check_values(key_b, b, module.weight.dtype)
        if max_delta is not None:
            scaling = abs(weights.config.scaling_for(path, rank))
            bound = scaling * norm_product(a, b)
            if not bound <= max_delta:
                raise AdapterMismatchError(f"{key_b}: the update s·B·A may reach {bound:.3g} per weight (limit "
                                           f"{max_delta:g}); the adapter is far larger than any trained one", key=key_b)
        lora[resolved] = (a, b)
        sources[resolved] = path
        if resolved != path:
            pins[resolved] = (path, rank)
    saved: dict[str, torch.Tensor] = {}
    params = index.params  # with remove_duplicate=False: tied weights (lm_head) under every name
    for key, t in weights.modules_to_save.items():
        full_key = PREFIX + key
        _check_values(full_key, t)
        module_path, _, param = key.rpartition(".")
        resolved = resolve_module_path(model, module_path, modules)
        if resolved is None:
            if not allow_detached:
                raise AdapterMismatchError(f"{full_key}: modules_to_save names {module_path!r}, "
                                           "which the base model lacks", key=full_key)
            saved[key] = t
            continue
        lora_inside = [p for p in lora if p == resolved or p.startswith(resolved + ".")]
        if lora_inside:
            _refuse_saved(full_key, resolved, f"this adapter's LoRA on {lora_inside[0]!r}")
        refuse_saved_on_lora(modules[resolved], key, resolved)
        target = params.get(f"{resolved}.{param}")
        if target is None:  # the module is already wrapped by another adapter's SavedModuleWrapper
            target = params.get(f"{resolved}.original_module.{param}")
        if target is not None:
            _check_values(full_key, t, target.dtype)
        if target is None or target.shape != t.shape:
            shape = None if target is None else tuple(target.shape)
            raise AdapterMismatchError(f"{full_key}: shape {tuple(t.shape)}, base has {shape}", key=full_key)
        saved[f"{resolved}.{param}"] = t
    _check_detached_head(model, saved, modules, weights.labels)
    return LoraWeights(_pin_patterns(weights.config, pins), lora, saved, weights.labels)


def _check_targeted(config: LoraConfig, path: str, key: str) -> None:
    """A tensor for a module the config does not target (or excludes) is one PEFT would never load: applying it
    would give outputs that differ from PEFT's for the same files, so the disagreement is refused."""
    targets = config.target_modules
    if targets != ALL_LINEAR and not matches_target(path, targets):
        raise AdapterMismatchError(f"{key}: module {path!r} is not among the config's target_modules "
                                   f"({config.target_description()}), so PEFT would ignore this tensor", key=key)
    if config.exclude_modules and matches_target(path, config.exclude_modules):
        raise AdapterMismatchError(f"{key}: module {path!r} is excluded by the config's exclude_modules, so PEFT "
                                   "would ignore this tensor", key=key)


def _check_detached_head(model: nn.Module, saved: dict[str, torch.Tensor], modules: dict[str, nn.Module],
                         labels: list[str] | None = None) -> None:
    """A classifier head the model lacks is applied to the pooled output as `pooled @ W.T + b`, so its
    shapes are checked now, not at the first classify request: W (labels, hidden) and b (labels,).
    Label names the adapter carries must name every output of its own head, no more, no fewer."""
    head = saved.get("classifier.weight", saved.get("score.weight"))
    if labels is not None and head is not None and head.dim() >= 1 and len(labels) != head.shape[0]:
        raise AdapterMismatchError(f"labels: {len(labels)} names for a classifier head with {head.shape[0]} outputs",
                                   key="labels")
    detached = {k: t for k, t in saved.items() if k.rpartition(".")[0] not in modules}
    w, b = detached.get("classifier.weight"), detached.get("classifier.bias")
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if w is not None and (w.dim() != 2 or w.shape[0] == 0 or (hidden is not None and w.shape[1] != hidden)):
        key = PREFIX + "classifier.weight"
        raise AdapterMismatchError(f"{key}: shape {tuple(w.shape)}, expected (labels >= 1, {hidden or 'hidden'})",
                                   key=key)
    if b is not None and (w is None or tuple(b.shape) != (w.shape[0],)):
        key = PREFIX + "classifier.bias"
        expected = "no bias without classifier.weight" if w is None else f"({w.shape[0]},)"
        raise AdapterMismatchError(f"{key}: shape {tuple(b.shape)}, expected {expected}", key=key)


def _pin_patterns(config: LoraConfig, pins: dict[str, tuple[str, int]]) -> LoraConfig:
    """rank_pattern/alpha_pattern were matched against the saved paths (`bert.encoder...`). Where a path
    was renamed onto the model (`encoder...`) and a pattern would now match differently, pin that module's
    rank and alpha with an exact pattern placed first, so the scaling cannot silently change."""
    rank_pins, alpha_pins = {}, {}
    for resolved, (path, rank) in pins.items():
        if config.rank_for(resolved) != rank or config.alpha_for(resolved) != config.alpha_for(path):
            rank_pins[exact_pattern(resolved)] = rank
            alpha_pins[exact_pattern(resolved)] = config.alpha_for(path)
    if not rank_pins:
        return config
    return replace(config, rank_pattern={**rank_pins, **config.rank_pattern},
                   alpha_pattern={**alpha_pins, **config.alpha_pattern})
