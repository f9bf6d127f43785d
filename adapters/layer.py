"""The LoRA layer: a frozen linear weight W0 plus low-rank updates, several adapters resident at once.

            x (…, in)
        ┌──────┴───────────────┐
        │                      │ dropout (training only)
   W0 (frozen)            A  (r, in)      init: kaiming-uniform(a=√5)
        │                      │
        │                 B  (out, r)     init: zeros, so a new adapter starts as the identity
        └──── + ◄─── s · ──────┘          s = alpha / r   (alpha / √r with rsLoRA)
              y (…, out)

Three ways to run (Hu et al. 2021, §4.1 for the merge):
  * single adapter, unmerged:  y = W0 x + s·B·A·x
  * mixed batch: row i uses its own adapter (or none), gathered from a stacked table, like Punica's BGMV
  * merged: W0 is overwritten in place by W0 + s·B·A (zero overhead). Unmerging copies the pristine
    W0 back, which is exact to the bit, unlike PEFT's `W -= s·B·A` which drifts in bf16/fp16.

While adapter M is merged, any other adapter X is still served exactly (up to rounding) by adding
s_X·B_X·A_X·x − s_M·B_M·A_M·x, so merged mode never blocks requests for other adapters.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from adapters.merge_kernel import MergeJob, write_merged
from adapters.routing import Router, grouped_forward, rows_per_route, stacked_tables

__all__ = ["LoraLinear", "Router", "is_lora_target_type", "conv1d_type", "norm_product"]


@functools.cache
def conv1d_type() -> type | None:
    """transformers' Conv1D (GPT-2 stores its weight as (in, out)); None when transformers is absent."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        return None
    return Conv1D


def is_lora_target_type(module: nn.Module) -> bool:
    conv1d = conv1d_type()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def norm_product(a: torch.Tensor, b: torch.Tensor) -> float:
    """max_i‖B_i‖ · max_j‖A_:j‖ for A (r, in), B (out, r): by Cauchy-Schwarz at least every |(B·A)_ij|, found
    without forming the (out, in) product."""
    return float(b.detach().float().norm(dim=1).max()) * float(a.detach().float().norm(dim=0).max())


def _version_of(t: torch.Tensor) -> int:
    """In-place edit counter; tensors made under torch.inference_mode have none (and cannot be trained)."""
    return -1 if t.is_inference() else t._version


class LoraLinear(nn.Module):
    """Wraps an `nn.Linear` or GPT-2 `Conv1D` without copying its weight."""

    def __init__(self, base_layer: nn.Module, router: Router, global_ids: dict[str, int]) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.fan_in_fan_out = not isinstance(base_layer, nn.Linear)  # Conv1D: weight is (in, out)
        w = base_layer.weight
        in_out = (w.shape[0], w.shape[1]) if self.fan_in_fan_out else (w.shape[1], w.shape[0])
        self.in_features, self.out_features = in_out
        self.lora_A = nn.ModuleDict()  # name -> Linear(in, r): weight (r, in)
        self.lora_B = nn.ModuleDict()  # name -> Linear(r, out): weight (out, r)
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.active_adapter: str | None = None
        self.merged_adapter: str | None = None
        self._router = router
        self._global_ids = global_ids  # shared name -> id table of the model
        self._pristine: torch.Tensor | None = None  # W0 snapshot, taken at the first merge
        self._pristine_absmax = 0.0
        self._merge_limit = 0.0
        self._stack_cache: tuple[tuple, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._norm_cache: dict[str, tuple[tuple[int, int], float]] = {}  # name -> (A/B versions, ‖B‖·‖A‖ bound)
        # name -> (A weight, B weight): the same Parameters as in lora_A/lora_B, reachable without the
        # nn.Module attribute lookups that a switch over hundreds of layers would otherwise pay for
        self._ab: dict[str, tuple[nn.Parameter, nn.Parameter]] = {}

    # ------------------------------------------------------------------ adapters
    def add_adapter(self, name: str, rank: int, scaling: float, dropout: float = 0.0, *,
                    A: torch.Tensor | None = None, B: torch.Tensor | None = None) -> None:
        w = self.base_layer.weight
        lin_a = nn.Linear(self.in_features, rank, bias=False, device=w.device, dtype=w.dtype)
        lin_b = nn.Linear(rank, self.out_features, bias=False, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            if A is None:  # training init (PEFT / Hu et al.): A random, B zero, so ΔW = 0 at start
                nn.init.kaiming_uniform_(lin_a.weight, a=math.sqrt(5))
                nn.init.zeros_(lin_b.weight)
            else:
                lin_a.weight.copy_(A)  # (r, in)
                lin_b.weight.copy_(B)  # (out, r)
        self.lora_A[name], self.lora_B[name] = lin_a, lin_b
        self._ab[name] = (lin_a.weight, lin_b.weight)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[name] = scaling
        self._stack_cache = None
        self._norm_cache.pop(name, None)

    def remove_adapter(self, name: str) -> None:
        if name == self.merged_adapter:
            self.unmerge()
        for d in (self.lora_A, self.lora_B, self.lora_dropout):
            del d[name]
        del self.scaling[name], self._ab[name]
        self._norm_cache.pop(name, None)
        if self.active_adapter == name:
            self.active_adapter = None
        self._stack_cache = None

    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    # Code that reads `layer.weight` (weight tying, init helpers) keeps working once the layer is wrapped.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def _branch(self, x: torch.Tensor, name: str, *, sign: float = 1.0) -> torch.Tensor:
        x = self.lora_dropout[name](x.to(self.lora_A[name].weight.dtype))
        return self.lora_B[name](self.lora_A[name](x)) * (sign * self.scaling[name])  # (…, r) -> (…, out)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._router.row_ids is None and self.merged_adapter is None:
            active = self.active_adapter
            if active is not None and active in self._ab and self._fusable(x, active):
                return self._fused_forward(x, active)
        result = self.base_layer(x)  # (…, out): W0 x, or (W0 + ΔW_M) x while M is merged
        if self._router.row_ids is not None and self.lora_A:
            return self._mixed_forward(x, result)
        active, merged = self.active_adapter, self.merged_adapter
        if active == merged:
            return result
        if active is not None and active in self.lora_A:
            result = self._add_branch(result, x, active)
        if merged is not None:
            result = self._add_branch(result, x, merged, sign=-1.0)
        return result

    def _dropout_on(self, name: str) -> bool:
        """`name`'s dropout would change this forward (training, with a rate above 0)."""
        return self.training and not isinstance(self.lora_dropout[name], nn.Identity)

    def _base_hooked(self) -> bool:
        """Hooks on the base layer see its output; a hook may keep that tensor (activation capture), so the
        LoRA term must not be added into it in place."""
        base = self._modules["base_layer"]
        return bool(base._forward_hooks or base._forward_pre_hooks)

    def _fusable(self, x: torch.Tensor, name: str) -> bool:
        """The fused single-adapter path computes the base layer itself, so only for a plain Linear or
        Conv1D (a subclass may quantize or otherwise change the maths) without hooks, in one dtype, and
        without dropout to apply."""
        base = self._modules["base_layer"]
        if type(base) is not nn.Linear and type(base) is not conv1d_type():
            return False
        if self._base_hooked():
            return False
        if self._dropout_on(name):
            return False
        return x.dtype == base.weight.dtype == self._ab[name][0].dtype

    def _fused_forward(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """W0 x + b + s·B·A·x with the LoRA term written first and the base GEMM accumulating onto it
        (beta = 1): the GEMM reads that buffer inside its compute-bound loop, where adding the term after
        the base output exists costs a separate read and write of the whole (N, out) output."""
        base = self._modules["base_layer"]
        (a, b), s = self._ab[name], self.scaling[name]
        x2 = x.reshape(-1, self.in_features)  # (N, in)
        h = x2 @ a.T  # (N, in) @ (in, r) -> (N, r)
        if base.bias is not None:
            out = torch.addmm(base.bias, h, b.T, alpha=s)  # (N, out) = b + s · (N, r) @ (r, out)
        else:
            out = torch.mm(h * s, b.T)  # (N, r) @ (r, out)
        w = base.weight  # Linear (out, in); Conv1D (in, out)
        out.addmm_(x2, w if self.fan_in_fan_out else w.T)  # (N, out) += (N, in) @ (in, out)
        return out.reshape(*x.shape[:-1], self.out_features)

    def _add_branch(self, result: torch.Tensor, x: torch.Tensor, name: str, *, sign: float = 1.0) -> torch.Tensor:
        """result + s·B·A·x. Without dropout, and when the dtypes agree, the scaling and the addition fold
        into one addmm: no (…, out) temporaries besides the result (a 1.10x budget leaves no room for two)."""
        a, b = self._ab[name]
        if self._dropout_on(name) or result.dtype != a.dtype or self._base_hooked():
            return result + self._branch(x, name, sign=sign).to(result.dtype)
        h = x.reshape(-1, self.in_features).to(a.dtype) @ a.T  # (N, in) @ (in, r) -> (N, r)
        # In place: result is the base layer's fresh output, which its backward does not keep. An out-of-place
        # addmm would allocate and write a second (N, out) tensor: measured, that is a third of the branch's cost.
        out = result.reshape(-1, self.out_features)  # a view of result (a copy only if result is not contiguous)
        out.addmm_(h, b.T, alpha=sign * self.scaling[name])  # (N, out) += s · (N, r) @ (r, out)
        return out.reshape(result.shape)

    def _mixed_forward(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """Row i gets s_i·B_i·A_i·x_i with one gather + two batched matmuls, not a loop over adapters."""
        per_row = rows_per_route(self._router, x.shape[0])
        if self._needs_autograd():
            return grouped_forward(self, x, result, per_row)
        table, a_stack, b_stack = self._stacks()
        local = table[self._router.row_ids]  # (Bsz,) slot per row; slot 0 = base rows
        # Slot 0 is empty only while nothing is merged here; otherwise base rows must subtract M's branch.
        # Asked of the host-side names, not of `local`: reading a device tensor would sync a GPU once per layer.
        names = self._router.row_names
        if self.merged_adapter is None and not (any(n in self._ab for n in names) if names is not None
                                                else bool(local.any())):
            return result
        bsz = local.shape[0]
        # Routed row i owns x's rows i·k … i·k+k-1, consecutive in memory: one view, as for a plain (B, T, in).
        t = x.numel() // (bsz * self.in_features)  # k·T tokens per routed row (explicit: x may be empty)
        x3 = x.reshape(bsz, t, self.in_features).to(a_stack.dtype)  # (Bsz, k·T, in)
        a_rows = a_stack[local]  # (Bsz, R, in)
        b_rows = b_stack[local]  # (Bsz, out, R), scaling folded in
        h = torch.bmm(x3, a_rows.transpose(1, 2))  # (Bsz, k·T, R)
        if result.dtype != h.dtype or self._base_hooked():
            return result + torch.bmm(h, b_rows.transpose(1, 2)).reshape(result.shape).to(result.dtype)
        # result + h @ Bᵀ in one call: (Bsz, k·T, out) + (Bsz, k·T, R) @ (Bsz, R, out)
        out = result.reshape(bsz, t, self.out_features)  # in place, as in _add_branch
        out.baddbmm_(h, b_rows.transpose(1, 2))
        return out.reshape(result.shape)

    def _needs_autograd(self) -> bool:
        """The stacked tables are detached copies without dropout: fine for serving, wrong for training."""
        if self.training and any(self._dropout_on(name) for name in self.lora_dropout):
            return True
        return torch.is_grad_enabled() and any(p.requires_grad for pair in self._ab.values() for p in pair)

    def _stacks(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The stacked tables of routing.stacked_tables, rebuilt only when adapters, the merge or (training) the
        factors' values change: they are copies, so an optimizer step (which bumps `_version`) must rebuild them."""
        version = (self._router.version, tuple((_version_of(self.lora_A[n].weight), _version_of(self.lora_B[n].weight))
                                               for n in self.adapter_names()))
        if self._stack_cache is None or self._stack_cache[0] != version:
            self._stack_cache = (version, *stacked_tables(self))
        return self._stack_cache[1:]

    # ------------------------------------------------------------------ merge
    def delta_weight(self, name: str) -> torch.Tensor:
        """s·B·A in the base weight's orientation: (out, in), or (in, out) for Conv1D."""
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        delta = (b @ a) * self.scaling[name]  # (out, r) @ (r, in) -> (out, in)
        return delta.T if self.fan_in_fan_out else delta

    def snapshot_pristine(self, device: torch.device | str | None = None) -> None:
        if self._pristine is None:
            w = self.base_layer.weight.detach()
            self._pristine = w.to(device or w.device, copy=True)
            self._pristine_absmax = float(w.abs().max()) if w.numel() else 0.0
            # Half the dtype's max: the bound below must stay under it (0 for a non-float weight: always check).
            self._merge_limit = 0.5 * torch.finfo(w.dtype).max if w.dtype.is_floating_point else 0.0

    def pristine_nbytes(self) -> int:
        return 0 if self._pristine is None else self._pristine.numel() * self._pristine.element_size()

    def may_overflow(self, name: str) -> bool:
        """Cheap bound: |W0 + s·B·A| ≤ max|W0| + |s|·max_i‖B_i‖·max_j‖A_:j‖ (Cauchy-Schwarz), and every partial
        sum of the matmul obeys it too. The unscaled B·A also gets the bound (factor max(|s|, 1)), since a
        backend may round it before applying s. Well under the dtype's max, no inf is possible and the
        merge needs no full check: a few tiny norms instead of a scratch copy of W."""
        bound = self._pristine_absmax + max(abs(self.scaling[name]), 1.0) * self._norm_product(name)
        return not bound < self._merge_limit  # also True for a NaN bound

    def _norm_product(self, name: str) -> float:
        """max_i‖B_i‖ · max_j‖A_:j‖, cached until A or B change (their `_version` moves on any in-place write)."""
        a, b = self._ab[name]
        versions = (_version_of(a), _version_of(b))
        cached = self._norm_cache.get(name)
        if cached is None or cached[0] != versions:
            cached = self._norm_cache[name] = (versions, norm_product(a, b))
        return cached[1]

    def merge_job(self, name: str, out: torch.Tensor | None = None) -> MergeJob:
        """W0 + s·B·A into W (or into `out`), as a job for write_merged: the only merge formula, shared by the
        commit and the safety check so that both round identically. Never W -= …: always from W0."""
        w = self._modules["base_layer"].weight  # straight from _modules: nn.Module.__getattr__ is slow
        (a, b), s = self._ab[name], self.scaling[name]
        # In W's own layout: Linear (out, in) = B (out, r) @ A (r, in); Conv1D (in, out) = Aᵀ (in, r) @ Bᵀ (r, out).
        left, right = (a.T, b.T) if self.fan_in_fan_out else (b, a)
        assert self._pristine is not None, "snapshot_pristine() first"
        # W0 as kept (possibly on the host): write_merged moves it to W's device one layer at a time.
        return (w if out is None else out, self._pristine, left, right, s)

    def _pristine_on_device(self, w: torch.Tensor) -> torch.Tensor:
        assert self._pristine is not None, "snapshot_pristine() first"
        return self._pristine if self._pristine.device == w.device else self._pristine.to(w.device, non_blocking=True)

    @torch.no_grad()
    def merged_candidate_is_finite(self, name: str, fused: bool = True) -> bool:
        """PEFT's safe_merge: build the merged weight in a scratch buffer and look at it; W is not touched."""
        w = self.base_layer.weight
        # W's own strides (not empty_like's, which makes a sliced W contiguous): the candidate then takes the same
        # path in write_merged as the commit, so both round identically.
        candidate = torch.empty_strided(w.shape, w.stride(), dtype=w.dtype, device=w.device)
        write_merged([self.merge_job(name, out=candidate)], fused=fused)
        return bool(torch.isfinite(candidate).all())

    def merge(self, name: str | None) -> None:
        """Write W = W0 + s·B·A (or W0 for None) straight from the pristine copy: a switch is one pass.
        (LoraModel.merge batches every layer's job into one write_merged call instead.)"""
        if torch.is_grad_enabled():  # no grad-mode context when grad is already off: unmerge calls this per layer
            with torch.no_grad():
                return self.merge(name)
        if name not in self._ab:
            name = None
        if name is None:
            w = self._modules["base_layer"].weight
            w.copy_(self._pristine_on_device(w))
        else:
            write_merged([self.merge_job(name)])
        self.mark_merged(name)

    def mark_merged(self, name: str | None) -> None:
        # Plain state goes straight into __dict__: nn.Module.__setattr__ costs microseconds a call, and a
        # switch makes a few per layer. (These attributes are never parameters, buffers or modules.)
        self.__dict__.update(merged_adapter=name, _stack_cache=None)

    def unmerge(self) -> None:
        if self._pristine is not None and self.merged_adapter is not None:
            self.merge(None)  # a copy of W0, never a subtraction
        self.mark_merged(None)
