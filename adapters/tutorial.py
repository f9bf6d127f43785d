"""The names from the well-known from-scratch LoRA tutorials (e.g. "LLMs from scratch", appendix E).

    LoRALayer(in_dim, out_dim, rank, alpha)     x ↦ alpha · (x @ A @ B)
    LinearWithLoRA(linear, rank, alpha)          linear(x) + LoRALayer(x)
    replace_linear_with_lora(model, rank, alpha) swaps every nn.Linear, recursing over named_children

Two conventions differ from PEFT's, and from the rest of this library:
  * the tutorials scale by `alpha`, not `alpha / r`; a tutorial alpha of a equals a PEFT lora_alpha
    of a·r;
  * they store A as (in, r) and B as (r, out), the transposes of PEFT's lora_A (r, in) and
    lora_B (out, r).
`to_lora_weights()` converts both, so a tutorial-trained model saves as a PEFT adapter.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from adapters.config import LoraConfig, exact_pattern
from adapters.weights import LoraWeights

__all__ = ["LoRALayer", "LinearWithLoRA", "replace_linear_with_lora", "to_lora_weights"]


class LoRALayer(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, rank: int, alpha: float) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(in_dim, rank))  # (in, r): transposed w.r.t. PEFT
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.B = nn.Parameter(torch.zeros(rank, out_dim))  # (r, out)
        self.alpha = alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.alpha * (x @ self.A @ self.B)  # (…, in) @ (in, r) @ (r, out) -> (…, out)


class LinearWithLoRA(nn.Module):
    def __init__(self, linear: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.linear = linear
        self.lora = LoRALayer(linear.in_features, linear.out_features, rank, alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.lora(x)


def replace_linear_with_lora(model: nn.Module, rank: int, alpha: float) -> nn.Module:
    for name, module in model.named_children():
        if isinstance(module, nn.Linear):
            setattr(model, name, LinearWithLoRA(module, rank, alpha))
        else:
            replace_linear_with_lora(module, rank, alpha)
    return model


def to_lora_weights(model: nn.Module) -> LoraWeights:
    """PEFT-oriented weights of every LinearWithLoRA in `model`, keyed by the wrapped Linear's path.

    Converts both conventions: A and B are transposed, and lora_alpha = alpha·r so that PEFT's
    alpha/r equals the tutorial's alpha. Layers with another rank or alpha than the first get exact
    rank_pattern/alpha_pattern entries."""
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hyper: dict[str, tuple[int, float]] = {}
    for name, module in model.named_modules():
        if isinstance(module, LinearWithLoRA):
            a, b = module.lora.A.detach().T, module.lora.B.detach().T  # (r, in), (out, r)
            lora[name] = (a.contiguous(), b.contiguous())
            rank = module.lora.A.shape[1]
            hyper[name] = (rank, module.lora.alpha * rank)
    if not lora:
        raise ValueError("model holds no LinearWithLoRA")
    rank, alpha = next(iter(hyper.values()))
    odd = {exact_pattern(n): h for n, h in hyper.items() if h != (rank, alpha)}
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=sorted(lora),
                        rank_pattern={p: r for p, (r, _) in odd.items()},
                        alpha_pattern={p: a for p, (_, a) in odd.items()})
    return LoraWeights(config, lora)
