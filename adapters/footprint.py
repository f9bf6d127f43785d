"""Storage efficiency made visible: an adapter's parameters and bytes beside the base model's.

The point of LoRA serving: one 22.7M-parameter MiniLM (or a 66M DistilBERT) stays resident once,
and each task adds well under 2% of its bytes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from adapters.weights import LoraWeights

__all__ = ["Footprint", "footprint", "model_footprint"]


@dataclass(frozen=True)
class Footprint:
    adapter_parameters: int
    adapter_bytes: int
    base_parameters: int
    base_bytes: int

    @property
    def parameter_ratio(self) -> float:
        return self.adapter_parameters / self.base_parameters if self.base_parameters else 0.0

    @property
    def bytes_ratio(self) -> float:
        return self.adapter_bytes / self.base_bytes if self.base_bytes else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "parameter_ratio": self.parameter_ratio, "bytes_ratio": self.bytes_ratio}

    def __str__(self) -> str:
        return (f"adapter {self.adapter_parameters:,} params / {self.adapter_bytes:,} B  vs  base "
                f"{self.base_parameters:,} params / {self.base_bytes:,} B  ({100 * self.parameter_ratio:.3f}% "
                f"of parameters, {100 * self.bytes_ratio:.3f}% of bytes)")


def model_footprint(model: nn.Module) -> tuple[int, int]:
    """(parameters, bytes) of a model, counting shared tensors once."""
    seen: set[int] = set()
    params = nbytes = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        params += p.numel()
        nbytes += p.numel() * p.element_size()
    return params, nbytes


def footprint(weights: LoraWeights, base: nn.Module | tuple[int, int]) -> Footprint:
    base_params, base_bytes = base if isinstance(base, tuple) else model_footprint(base)
    return Footprint(weights.num_parameters(), weights.nbytes(), base_params, base_bytes)
