"""Exact weighted composition of adapters, with optional SVD truncation.

For every targeted module the composed update is exactly  ΔW = Σ wᵢ·sᵢ·Bᵢ·Aᵢ,  obtained by stacking
the ranks:

    A = [A₁; A₂; …]             (Σrᵢ, in)
    B = [w₁s₁B₁, w₂s₂B₂, …]     (out, Σrᵢ)        so  B·A = Σ wᵢ·sᵢ·Bᵢ·Aᵢ,   with scaling 1

PEFT's "linear" mode instead averages the A's and the B's separately, and (Σ wB)(Σ wA) is not the
weighted sum of the deltas. Truncation to rank k keeps the top-k singular triplets of ΔW, computed
from thin QRs of B and Aᵀ so the full (out, in) matrix is never formed, and reports the relative
Frobenius error ‖ΔW − ΔW_k‖ / ‖ΔW‖ over all modules.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from adapters.config import LoraConfig, exact_pattern
from adapters.errors import AdapterError
from adapters.weights import LoraWeights

__all__ = ["compose", "ComposeResult"]


@dataclass
class ComposeResult:
    weights: LoraWeights
    relative_error: float | None  # None when no truncation was asked for
    ranks: dict[str, int]


def _truncate(a: torch.Tensor, b: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Best rank-k factors of b @ a; returns (A_k (k, in), B_k (out, k), discarded energy, total energy).
    In float64 (the factors are small): float32 loses the error of tiny deltas (weights near 1e-25) whose
    intermediate products and squared singular values underflow."""
    qb, rb = torch.linalg.qr(b.double())  # b: (out, R) -> qb (out, R), rb (R, R)
    qa, ra = torch.linalg.qr(a.double().T)  # a.T: (in, R) -> qa (in, R), ra (R, R)
    u, s, vh = torch.linalg.svd(rb @ ra.T)  # (R, R) core: b @ a = qb @ core @ qa.T
    k = min(k, s.numel())
    b_k = (qb @ u[:, :k]) * s[:k]  # (out, k)
    a_k = vh[:k] @ qa.T  # (k, in)
    s2 = s ** 2
    return a_k.to(a.dtype), b_k.to(b.dtype), float(s2[k:].sum()), float(s2.sum())


def compose(items: Sequence[tuple[LoraWeights, float]], *, rank: int | None = None) -> ComposeResult:
    if not items:
        raise AdapterError("compose needs at least one adapter")
    for weights, w in items:
        if weights.modules_to_save:
            raise AdapterError("cannot compose adapters that carry modules_to_save (full tensors do not add up)",
                               field="modules_to_save")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise AdapterError(f"composition weight {w!r} is not a finite number", field="weight")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise AdapterError(f"rank must be a positive integer, got {rank!r}", field="rank")
    paths = sorted({p for weights, _ in items for p in weights.lora})
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    discarded = total = 0.0
    for path in paths:
        a_parts, b_parts = [], []
        for weights, w in items:
            if path in weights.lora:
                a, b = weights.lora[path]
                a_parts.append(a.float())  # (rᵢ, in)
                b_parts.append(b.float() * (w * weights.scaling_for(path)))  # (out, rᵢ)
        if len({a.shape[1] for a in a_parts}) > 1 or len({b.shape[0] for b in b_parts}) > 1:
            shapes = sorted({(int(b.shape[0]), int(a.shape[1])) for a, b in zip(a_parts, b_parts, strict=True)})
            raise AdapterError(f"the adapters disagree on the shape (out, in) of {path}: {shapes}; they were made "
                               "for different base models", key=path)
        a_cat, b_cat = torch.cat(a_parts, 0), torch.cat(b_parts, 1)  # (Σr, in), (out, Σr)
        if not (torch.isfinite(a_cat).all() and torch.isfinite(b_cat).all()):
            raise AdapterError(f"the weighted combination overflows float32 at {path}; use smaller weights",
                               key=path)
        if rank is not None and rank < a_cat.shape[0]:
            try:
                a_cat, b_cat, d, t = _truncate(a_cat, b_cat, rank)
            except torch.linalg.LinAlgError as exc:  # e.g. the core's entries overflow float32
                raise AdapterError(f"SVD truncation failed at {path}: {exc}", key=path) from exc
            if not (torch.isfinite(a_cat).all() and torch.isfinite(b_cat).all() and math.isfinite(t)):
                raise AdapterError(f"SVD truncation overflows float32 at {path}; use smaller weights", key=path)
            discarded, total = discarded + d, total + t
        elif rank is not None:
            total += float(torch.linalg.matrix_norm(b_cat.double() @ a_cat.double())) ** 2  # float64, as _truncate
        lora[path] = (a_cat.contiguous(), b_cat.contiguous())
    ranks = {p: int(a.shape[0]) for p, (a, _) in lora.items()}
    # Scaling 1 everywhere: alpha = r per module, written as exact-path patterns PEFT understands.
    config = LoraConfig(
        r=max(ranks.values()), lora_alpha=max(ranks.values()), target_modules=paths,
        rank_pattern={exact_pattern(p): r for p, r in ranks.items()},
        alpha_pattern={exact_pattern(p): float(r) for p, r in ranks.items()},
        task_type=items[0][0].config.task_type, base_model_name_or_path=items[0][0].config.base_model_name_or_path,
    )
    err = math.sqrt(discarded / total) if rank is not None and total > 0 else (0.0 if rank is not None else None)
    return ComposeResult(LoraWeights(config, lora), err, ranks)
