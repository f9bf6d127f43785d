"""An adapter's tensors in memory, keyed the way PEFT keys them on disk.

    base_model.model.<module path>.lora_A.weight   (r, in)
    base_model.model.<module path>.lora_B.weight   (out, r)
    base_model.model.<modules_to_save path>.<param> full tensor (e.g. a classifier head)

No adapter name appears in the keys, exactly as PEFT's `save_pretrained` writes them.

`labels` (a classifier's label names, in output order) is not a tensor: serialization carries it in the
safetensors header's `__metadata__`, which PEFT ignores, so the files stay loadable by PEFT.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from adapters.config import LoraConfig
from adapters.errors import AdapterFormatError, UnsupportedAdapterError

__all__ = ["LoraWeights", "PREFIX"]

PREFIX = "base_model.model."

# Key suffixes of PEFT features we refuse, with the config field a user would recognise.
_UNSUPPORTED_KEYS = {
    "lora_magnitude_vector": "use_dora",
    "lora_embedding_A": "embedding LoRA (lora_embedding_A)",
    "lora_embedding_B": "embedding LoRA (lora_embedding_B)",
    "lora_A.bias": "lora_bias",
    "lora_B.bias": "lora_bias",
}


@dataclass
class LoraWeights:
    config: LoraConfig
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module path -> (A (r, in), B (out, r))
    modules_to_save: dict[str, torch.Tensor] = field(default_factory=dict)  # "classifier.weight" -> tensor
    labels: list[str] | None = None  # a classifier's label names, output j -> labels[j]

    # ---------------------------------------------------------------- PEFT keys
    def to_state_dict(self) -> dict[str, torch.Tensor]:
        sd: dict[str, torch.Tensor] = {}
        for path, (a, b) in sorted(self.lora.items()):
            sd[f"{PREFIX}{path}.lora_A.weight"] = a.detach().contiguous()
            sd[f"{PREFIX}{path}.lora_B.weight"] = b.detach().contiguous()
        for key, t in sorted(self.modules_to_save.items()):
            sd[f"{PREFIX}{key}"] = t.detach().contiguous()
        return sd

    @classmethod
    def from_state_dict(cls, config: LoraConfig, sd: dict[str, torch.Tensor]) -> LoraWeights:
        halves: dict[str, dict[str, torch.Tensor]] = {}
        saved: dict[str, torch.Tensor] = {}
        for key, tensor in sorted(sd.items()):  # sorted: the same file always names the same key
            for marker, feature in _UNSUPPORTED_KEYS.items():
                if f".{marker}" in key:
                    raise UnsupportedAdapterError(f"tensor {key!r} belongs to {feature}, which is not supported",
                                                  key=key)
            if not key.startswith(PREFIX):
                raise AdapterFormatError(f"tensor key {key!r} does not start with {PREFIX!r}", key=key)
            rest = key[len(PREFIX):]
            if rest.endswith((".lora_A.weight", ".lora_B.weight")):
                path, half = rest[: -len(".lora_A.weight")], rest[-len("lora_A.weight"):-len(".weight")]
                halves.setdefault(path, {})[half] = tensor
            elif _is_saved_module(rest, config.modules_to_save):
                saved[rest] = tensor
            elif ".lora_" in rest:
                raise AdapterFormatError(f"tensor key {key!r} is not a PEFT LoRA key (adapter name in the key?)",
                                         key=key)
            else:
                raise AdapterFormatError(f"tensor key {key!r} is neither a LoRA matrix nor under modules_to_save",
                                         key=key)
        lora = {}
        for path, pair in sorted(halves.items()):
            for half in ("lora_A", "lora_B"):
                if half not in pair:
                    key = f"{PREFIX}{path}.{half}.weight"
                    raise AdapterFormatError(f"{key} is missing", key=key)
            lora[path] = (pair["lora_A"], pair["lora_B"])
        if not lora and not saved:
            raise AdapterFormatError("the adapter holds no tensors")
        return cls(config=config, lora=lora, modules_to_save=saved)

    # ---------------------------------------------------------------- facts
    def rank_of(self, path: str) -> int:
        return int(self.lora[path][0].shape[0])

    def max_rank(self) -> int:
        return max((self.rank_of(p) for p in self.lora), default=0)

    def scaling_for(self, path: str) -> float:
        return self.config.scaling_for(path, self.rank_of(path))

    def num_parameters(self) -> int:
        return sum(a.numel() + b.numel() for a, b in self.lora.values()) + sum(
            t.numel() for t in self.modules_to_save.values())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.to_state_dict().values())

    def targets(self) -> list[str]:
        return sorted(self.lora)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> LoraWeights:
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        return LoraWeights(self.config, {p: (move(a), move(b)) for p, (a, b) in self.lora.items()},
                           {k: move(t) for k, t in self.modules_to_save.items()}, self.labels)


def _is_saved_module(rest: str, modules_to_save: list[str] | None) -> bool:
    """PEFT's rule: a module is saved when its name equals an entry or ends with ".<entry>"; its tensors
    include those of its submodules, so a nested head (`classifier.dense.weight`) belongs to it too."""
    parts = rest.split(".")[:-1]  # the module path of the tensor, as components
    for entry in modules_to_save or []:
        wanted = entry.split(".")
        if any(parts[i:i + len(wanted)] == wanted for i in range(len(parts) - len(wanted) + 1)):
            return True
    return False
