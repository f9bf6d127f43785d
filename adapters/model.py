"""`LoraModel`: many adapters over one frozen base module, with exact merge, unmerge and switch.

    lm = LoraModel(base)                        # nothing is changed until an adapter arrives
    lm.add_adapter("sql", load_peft_dir(path))  # validated, then LoraLinear swapped in where needed
    with lm.route(["sql", None, "chat"]):       # one forward, a different adapter per row
        base(**batch)
    with lm.routing_kept():                     # another forward inside a paused one; its routing comes back
        ...
    lm.merge("sql")                             # W = W0 + s·B·A, zero overhead
    lm.unmerge()                                # W = W0, bit for bit
    lm.remove_adapter("sql"); lm.eject()        # the original module tree, the same objects

Exact restore: the first merge snapshots W0 of every wrapped layer. Memory cost: one extra copy of the
targeted weights (`pristine_nbytes()`; e.g. 43 MB for all-linear MiniLM-L6, 340 MB for all-linear
GPT-2 small, fp32), on `pristine_device`, by default the weights' own device ("cpu" keeps it off the
GPU at the price of a host-to-device read per merge). A merge or switch then writes W0 + s·B·A from
that copy with one addmm per layer, and unmerge copies W0 back; nothing is ever subtracted, so no
error accumulates however many switches come before. `release_pristine()` frees the copy while
nothing is merged.

Not thread-safe by itself: the serving engine holds its lock around every call here and every forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from adapters.config import LoraConfig
from adapters.errors import MergeError, UnknownAdapterError
from adapters.injection import resolve_targets, set_submodule
from adapters.layer import LoraLinear, Router
from adapters.merge_kernel import write_merged
from adapters.saved_modules import SavedModuleWrapper
from adapters.validation import refuse_lora_on_saved, refuse_saved_on_lora, validate_adapter
from adapters.weights import LoraWeights

__all__ = ["LoraModel"]


class LoraModel:
    def __init__(self, model: nn.Module, *, max_rank: int | None = None,
                 pristine_device: torch.device | str | None = None, fused_merges: bool = True) -> None:
        self.model = model
        self.max_rank = max_rank
        self.pristine_device = pristine_device
        # Merges of CPU float32/bfloat16 weights run on the one-pass C kernel when it was built
        # (adapters/merge_kernel.py); False keeps them on torch.addmm (the same formula, slower per switch).
        self.fused_merges = fused_merges
        self.router = Router()
        self.configs: dict[str, LoraConfig] = {}
        self.detached: dict[str, dict[str, torch.Tensor]] = {}  # modules_to_save the model lacks (heads)
        self.labels: dict[str, list[str]] = {}  # a resident adapter's classifier label names, if it has them
        self.active_adapter: str | None = None
        self.merged_adapter: str | None = None
        self._global_ids: dict[str, int] = {}
        self._next_id = 1
        self._originals: dict[str, nn.Module] = {}  # wrapped path -> the original module object
        # The wrappers by path, kept so that a switch or set_adapter need not walk the whole module tree
        # (hundreds of modules). Rebuilt whenever this class wraps or unwraps a module.
        self._layers: dict[str, LoraLinear] | None = None
        self._wrappers: dict[str, SavedModuleWrapper] | None = None
        self._tied: set[str] | None = None  # wrapped layers whose weight another parameter shares

    # ------------------------------------------------------------------ injection
    def lora_layers(self) -> dict[str, LoraLinear]:
        return dict(self._lora_layers())

    def _lora_layers(self) -> dict[str, LoraLinear]:
        if self._layers is None:
            self._layers = {n: m for n, m in self.model.named_modules() if isinstance(m, LoraLinear)}
        return self._layers

    def _saved_wrappers(self) -> dict[str, SavedModuleWrapper]:
        if self._wrappers is None:
            self._wrappers = {n: m for n, m in self.model.named_modules() if isinstance(m, SavedModuleWrapper)}
        return self._wrappers

    def _tree_changed(self) -> None:
        self._layers = self._wrappers = self._tied = None

    def _tied_layers(self) -> set[str]:
        """Wrapped layers whose weight is tied to another parameter (GPT-2's lm_head and wte): merging into
        them would also change the other module (the input embeddings), so they are served unmerged only."""
        if self._tied is None:
            owners: dict[int, int] = {}
            for _, p in self.model.named_parameters(remove_duplicate=False):
                owners[p.data_ptr()] = owners.get(p.data_ptr(), 0) + 1
            self._tied = {path for path, layer in self._lora_layers().items()
                          if owners.get(layer.base_layer.weight.data_ptr(), 0) > 1}
        return self._tied

    def _wrap(self, path: str) -> LoraLinear:
        module = self.model.get_submodule(path)
        if isinstance(module, LoraLinear):
            return module
        layer = LoraLinear(module, self.router, self._global_ids)
        self._originals[path] = module
        set_submodule(self.model, path, layer)
        self._tree_changed()
        return layer

    def _wrap_saved(self, path: str) -> SavedModuleWrapper:
        module = self.model.get_submodule(path)
        if isinstance(module, SavedModuleWrapper):
            return module
        wrapper = SavedModuleWrapper(module, self.router)
        self._originals[path] = module
        set_submodule(self.model, path, wrapper)
        self._tree_changed()
        return wrapper

    def _register(self, name: str, config: LoraConfig) -> None:
        if name in self.configs:
            raise ValueError(f"adapter {name!r} is already resident")
        self.configs[name] = config
        self._global_ids[name] = self._next_id
        self._next_id += 1
        self.router.version += 1

    def add_adapter(self, name: str, weights: LoraWeights, *, validate: bool = True,
                    allow_detached: bool = False) -> LoraWeights:
        """Make `weights` resident under `name`. Validation runs first, so a bad adapter changes nothing."""
        if validate:
            weights = validate_adapter(self.model, weights, max_rank=self.max_rank, allow_detached=allow_detached)
        self._check_conflicts(weights)  # with the adapters resident now, even when validated elsewhere
        self._register(name, weights.config)
        if weights.labels is not None:
            self.labels[name] = list(weights.labels)
        try:
            self._install(name, weights)
        except BaseException:
            self.remove_adapter(name)  # e.g. out of device memory halfway: no half-added adapter stays
            raise
        return weights

    def _check_conflicts(self, weights: LoraWeights) -> None:
        """A module takes LoRA or is replaced whole (modules_to_save), never both across resident adapters."""
        saved, layers = self._saved_wrappers(), self._lora_layers()
        for path in weights.lora:
            refuse_lora_on_saved(saved.get(path), path)
        for key in weights.modules_to_save:
            module_path = key.rpartition(".")[0]
            refuse_saved_on_lora(layers.get(module_path), key, module_path)

    def _install(self, name: str, weights: LoraWeights) -> None:
        ref = next(p for p in self.model.parameters())
        for path, (a, b) in weights.lora.items():
            layer = self._wrap(path)
            w = layer.base_layer.weight
            layer.add_adapter(name, int(a.shape[0]), weights.scaling_for(path), A=a.to(w.device, w.dtype),
                              B=b.to(w.device, w.dtype))
            for param in layer._ab[name]:  # a served adapter is frozen; the base layer keeps its own flags
                param.requires_grad_(False)
            if self.merged_adapter is not None and layer._pristine is None:
                layer.snapshot_pristine(self.pristine_device)  # a newly wrapped layer is pristine now
        params = dict(self.model.named_parameters(remove_duplicate=False))  # a tied lm_head is under its own name
        by_module: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in weights.modules_to_save.items():
            module_path, _, param = key.rpartition(".")
            module_path = module_path.removesuffix(".original_module")
            target = params.get(f"{module_path}.{param}", params.get(f"{module_path}.original_module.{param}"))
            if target is not None:  # the replacement runs in the module's own code: same device and dtype
                by_module.setdefault(module_path, {})[param] = t.to(target.device, target.dtype)
            else:
                self.detached.setdefault(name, {})[key] = t.to(ref.device)
        for module_path, params in by_module.items():
            self._wrap_saved(module_path).add_adapter(name, params)

    def add_trainable_adapter(self, name: str, config: LoraConfig) -> list[str]:
        """Inject freshly initialised (A random, B zero) LoRA matrices at the config's targets."""
        targets = resolve_targets(self.model, config.target_modules, exclude=config.exclude_modules,
                                  modules_to_save=config.modules_to_save or ())
        self._register(name, config)
        for path in targets:
            layer = self._wrap(path)
            rank = config.rank_for(path)
            layer.add_adapter(name, rank, config.scaling_for(path, rank), config.lora_dropout)
        self.set_adapter(name)
        return targets

    def add_trainable_modules(self, name: str, paths: Sequence[str]) -> list[nn.Parameter]:
        """modules_to_save for training: trainable full copies of these modules' parameters, held under
        `name` by a wrapper, so the base module itself stays as loaded. get_weights() returns them under
        PEFT's keys (base_model.model.<path>.<param>). Returns the new parameters."""
        self._require(name)
        params: list[nn.Parameter] = []
        for path in paths:
            module = self.model.get_submodule(path)
            original = module.original_module if isinstance(module, SavedModuleWrapper) else module
            copies = {n: nn.Parameter(p.detach().clone()) for n, p in original.named_parameters()}
            self._wrap_saved(path).add_adapter(name, copies)
            params += copies.values()
        self.set_adapter(self.active_adapter)  # new wrappers follow the active adapter too
        return params

    def remove_adapter(self, name: str) -> None:
        self._require(name)
        if self.merged_adapter == name:
            self.unmerge()
        for layer in self.lora_layers().values():
            if name in layer.lora_A:
                layer.remove_adapter(name)
        for wrapper in self._saved_wrappers().values():
            wrapper.remove_adapter(name)
        del self.configs[name], self._global_ids[name]
        self.detached.pop(name, None)
        self.labels.pop(name, None)
        if self.active_adapter == name:
            self.active_adapter = None
        self.router.version += 1
        self._eject_unused()

    def _eject_unused(self) -> None:
        unused = [p for p, layer in self._lora_layers().items() if not layer.lora_A and layer.merged_adapter is None]
        unused += [p for p, wrapper in self._saved_wrappers().items() if not wrapper.replacements]
        for path in unused:
            set_submodule(self.model, path, self._originals.pop(path))
        if unused:
            self._tree_changed()

    def eject(self) -> nn.Module:
        """Remove every adapter and give back exactly the original module tree."""
        for name in list(self.configs):
            self.remove_adapter(name)
        return self.model

    # ------------------------------------------------------------------ selection
    def _require(self, name: str) -> None:
        if name not in self.configs:
            raise UnknownAdapterError(f"adapter {name!r} is not resident", key=name)

    def set_adapter(self, name: str | None) -> None:
        if name is not None:
            self._require(name)
        self.active_adapter = name
        for module in (*self._lora_layers().values(), *self._saved_wrappers().values()):
            module.__dict__["active_adapter"] = name  # a plain attribute; skips nn.Module.__setattr__ (µs each)

    @contextlib.contextmanager
    def route(self, names: Sequence[str | None]) -> Iterator[None]:
        """Within the block, row i of every forward uses adapter names[i] (None = the base)."""
        for n in set(names) - {None}:
            self._require(n)
        device = next(self.model.parameters()).device
        self.router.row_ids = torch.tensor([0 if n is None else self._global_ids[n] for n in names], device=device)
        self.router.row_names = list(names)
        try:
            yield
        finally:
            self.router.row_ids = None
            self.router.row_names = None

    @contextlib.contextmanager
    def routing_kept(self) -> Iterator[None]:
        """A block that starts unrouted (every row on the active adapter, as outside route()) and may route() or
        set_adapter() freely; on leaving it, which rows use which adapter (route()'s rows, the active adapter) is
        as it was on entering. For a forward paused between two of its layers while another one runs: it resumes
        routed as it started. Weights are not covered: the block must not add, remove, merge or unmerge."""
        row_ids, row_names, active = self.router.row_ids, self.router.row_names, self.active_adapter
        self.router.row_ids = self.router.row_names = None
        try:
            yield
        finally:
            self.router.row_ids, self.router.row_names = row_ids, row_names
            self.set_adapter(active)  # every layer's copy, whatever the block left in them

    # ------------------------------------------------------------------ merge
    @torch.no_grad()
    def merge(self, name: str) -> None:
        """Merged mode for `name` (a switch if another adapter is merged). Idempotent. Refuses, leaving
        the weights exactly as they were, if the result would hold a non-finite value."""
        self._require(name)
        if self.merged_adapter == name:
            self.set_adapter(name)
            return
        layers = self._lora_layers()
        tied = [path for path in self._tied_layers() if name in layers[path].scaling]
        if tied:
            raise MergeError(f"cannot merge {name!r}: {tied[0]}.weight is tied to another parameter (e.g. the "
                             "input embeddings), which a merge would change too; serve it unmerged", key=tied[0])
        for layer in layers.values():
            layer.snapshot_pristine(self.pristine_device)
        # The cheap bound clears almost every layer; only layers it cannot clear get the full check.
        for path, layer in layers.items():
            if (name in layer.scaling and layer.may_overflow(name)
                    and not layer.merged_candidate_is_finite(name, fused=self.fused_merges)):
                raise MergeError(f"merging {name!r} would make {path}.weight non-finite; nothing was changed",
                                 key=path)
        targeted = [layer for layer in layers.values() if name in layer.scaling]
        for layer in layers.values():
            if name not in layer.scaling and layer.merged_adapter is not None:
                layer.merge(None)  # a layer the new adapter does not touch goes back to W0
        # One pass from W0 per layer, all layers in one call: a switch needs no separate unmerge.
        write_merged([layer.merge_job(name) for layer in targeted], fused=self.fused_merges)
        for layer in targeted:
            layer.mark_merged(name)
        self.merged_adapter = name
        self.router.version += 1
        self.set_adapter(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        for layer in self._lora_layers().values():
            layer.unmerge()
        self.merged_adapter = None
        self.router.version += 1
        self._eject_unused()

    def release_pristine(self) -> None:
        """Free the W0 snapshots (only while nothing is merged); the next merge takes them again."""
        if self.merged_adapter is None:
            for layer in self.lora_layers().values():
                layer._pristine = None

    def pristine_nbytes(self) -> int:
        return sum(layer.pristine_nbytes() for layer in self.lora_layers().values())

    # ------------------------------------------------------------------ read back
    def merge_target_weights(self) -> dict[str, torch.Tensor]:
        """The base weights a merge can change, keyed by layer path (for fingerprints)."""
        return {path: layer.base_layer.weight for path, layer in sorted(self.lora_layers().items())}

    def pristine_weights(self) -> dict[str, torch.Tensor]:
        return {path: (layer._pristine if layer._pristine is not None else layer.base_layer.weight)
                for path, layer in sorted(self.lora_layers().items())}

    def get_weights(self, name: str) -> LoraWeights:
        """The resident adapter as saveable LoraWeights (e.g. after training)."""
        self._require(name)
        lora = {path: (layer.lora_A[name].weight.detach().clone(), layer.lora_B[name].weight.detach().clone())
                for path, layer in self.lora_layers().items() if name in layer.lora_A}
        saved = {f"{path}.{p}": t.detach().clone() for path, w in self._saved_wrappers().items()
                 for p, t in w.replacements.get(name, {}).items()}
        saved.update(self.detached.get(name, {}))
        return LoraWeights(self.configs[name], lora, saved, self.labels.get(name))

    def trainable_parameters(self, name: str) -> list[nn.Parameter]:
        """The LoRA matrices of `name` (A and B of every layer); see add_trainable_modules for heads."""
        self._require(name)
        params: list[nn.Parameter] = []
        for layer in self.lora_layers().values():
            if name in layer.lora_A:
                params += [layer.lora_A[name].weight, layer.lora_B[name].weight]
        return params
