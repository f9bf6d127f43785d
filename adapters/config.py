"""LoRA hyperparameters, read from and written to PEFT's `adapter_config.json`.

The config validates itself on construction (as PEFT's dataclass does in `__post_init__`), so a bad
file fails here, with the offending field named, before any tensor is looked at. Fields we do not
implement (DoRA, lora_bias, biases, embedding LoRA...) are refused rather than ignored: ignoring them
would silently produce wrong outputs.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from adapters.errors import AdapterFormatError, UnsupportedAdapterError, parse_json

__all__ = ["LoraConfig", "ALL_LINEAR", "exact_pattern"]

ALL_LINEAR = "all-linear"

# PEFT fields that change the maths. If a file sets one of them to anything but its neutral value we
# refuse it: (field, neutral values).
_UNSUPPORTED_IF_SET: dict[str, tuple[Any, ...]] = {
    "use_dora": (False, None),
    "lora_bias": (False, None),
    "bias": ("none", None),
    "layers_to_transform": (None, [], ()),
    "layers_pattern": (None, [], ()),
    "trainable_token_indices": (None, {}, []),
    "target_parameters": (None, [], ()),
    "alora_invocation_tokens": (None, [], ()),
    "use_qalora": (False, None),
    "layer_replication": (None, [], ()),
    "megatron_config": (None,),
    "use_bdlora": (False, None),
    "bdlora_config": (None, {}),
    "arrow_config": (None, {}),
    "runtime_config": None,  # bookkeeping only, accepted whatever it holds
}

# Fields that carry no maths for a loaded adapter and are accepted as they are.
_IGNORED = {
    "auto_mapping", "base_model_name_or_path", "revision", "inference_mode", "init_lora_weights", "loftq_config",
    "eva_config", "corda_config", "megatron_core", "exclude_modules", "use_qalora", "qalora_group_size",
    "ensure_weight_tying", "peft_version", "lora_ga_config", "runtime_config", "layers_pattern",
}

# init_lora_weights values that only choose how A and B start: a saved adapter is then a plain LoRA.
# The others (pissa*, olora, corda, loftq, lora_ga) also rewrite the base weights W0 during init, so the
# saved A/B are only correct on that modified base; served on the original they would be silently wrong.
# (PEFT's `path_initial_model_for_weight_conversion` turns such an adapter into a plain one, saved with
# init_lora_weights=True, which is accepted.)
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")


@dataclass
class LoraConfig:
    r: int = 8  # default rank
    lora_alpha: float = 8  # scaling numerator: s = alpha / r (or alpha / sqrt(r) with use_rslora)
    target_modules: list[str] | str = field(default_factory=lambda: ["query", "value"])  # suffixes, regex, all-linear
    lora_dropout: float = 0.0  # applied to the LoRA branch's input, training only
    use_rslora: bool = False
    fan_in_fan_out: bool = False  # True for GPT-2's Conv1D (weight stored as (in, out))
    rank_pattern: dict[str, int] = field(default_factory=dict)  # module-name regex -> rank
    alpha_pattern: dict[str, float] = field(default_factory=dict)  # module-name regex -> alpha
    modules_to_save: list[str] | None = None  # full tensors stored beside the LoRA ones (e.g. a classifier head)
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    exclude_modules: list[str] | str | None = None

    def __post_init__(self) -> None:
        self.r = _positive_int("r", self.r)
        self.lora_alpha = _finite_number("lora_alpha", self.lora_alpha)
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            raise AdapterFormatError(f"lora_dropout must be a number in [0, 1), got {self.lora_dropout!r}")
        for name in ("use_rslora", "fan_in_fan_out"):
            if not isinstance(getattr(self, name), bool):
                raise AdapterFormatError(f"{name} must be a boolean, got {getattr(self, name)!r}")
        self.target_modules = _targets("target_modules", self.target_modules)
        for name in ("task_type", "base_model_name_or_path"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise AdapterFormatError(f"{name} must be a string or null, got {getattr(self, name)!r}")
        if self.exclude_modules in ([], (), ""):  # PEFT writes an empty list for "exclude nothing"
            self.exclude_modules = None
        if self.exclude_modules is not None:
            self.exclude_modules = _targets("exclude_modules", self.exclude_modules)
        if not isinstance(self.rank_pattern, dict) or not isinstance(self.alpha_pattern, dict):
            raise AdapterFormatError("rank_pattern and alpha_pattern must be JSON objects")
        self.rank_pattern = {_regex("rank_pattern", k): _positive_int(f"rank_pattern[{k!r}]", v)
                             for k, v in self.rank_pattern.items()}
        self.alpha_pattern = {_regex("alpha_pattern", k): _finite_number(f"alpha_pattern[{k!r}]", v)
                              for k, v in self.alpha_pattern.items()}
        if self.modules_to_save is not None:
            if isinstance(self.modules_to_save, str) or not all(isinstance(m, str) for m in self.modules_to_save):
                raise AdapterFormatError("modules_to_save must be a list of module names")
            self.modules_to_save = list(self.modules_to_save)

    # -- per-module hyperparameters (PEFT's rule: the first pattern that matches the end of the name) --
    def rank_for(self, module_name: str) -> int:
        return _match_pattern(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        return _match_pattern(self.alpha_pattern, module_name, self.lora_alpha)

    def scaling_for(self, module_name: str, rank: int | None = None) -> float:
        r = rank if rank is not None else self.rank_for(module_name)
        alpha = self.alpha_for(module_name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    # -- PEFT's JSON --
    @classmethod
    def from_peft_dict(cls, data: Any) -> LoraConfig:
        if not isinstance(data, dict):
            raise AdapterFormatError(f"adapter_config.json must hold a JSON object, got {type(data).__name__}")
        peft_type = data.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise UnsupportedAdapterError(f"peft_type {peft_type!r} is not supported (only LORA)", field="peft_type")
        for key, neutral in _UNSUPPORTED_IF_SET.items():
            if neutral is not None and key in data and data[key] not in neutral:
                raise UnsupportedAdapterError(f"{key}={data[key]!r} is not supported", field=key)
        init = data.get("init_lora_weights", True)
        if not any(init is v or (isinstance(v, str) and init == v) for v in _PLAIN_INITS):
            raise UnsupportedAdapterError(
                f"init_lora_weights={init!r} is not supported: that initialisation also changes the base weights, "
                "so the adapter is only valid on its modified base; convert it to a plain LoRA with PEFT "
                "(save_pretrained(..., path_initial_model_for_weight_conversion=...))", field="init_lora_weights")
        known = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in data.items() if k in known}
        unknown = set(data) - known - set(_UNSUPPORTED_IF_SET) - _IGNORED - {"peft_type"}
        # Unknown fields from newer PEFT versions: refuse those that are set to a truthy value, as we
        # cannot know they are harmless. Falsy ones (None, False, {}, []) are the neutral defaults.
        for key in sorted(unknown):
            if data[key] not in (None, False, {}, [], "", 0):
                raise UnsupportedAdapterError(f"unknown adapter_config field {key}={data[key]!r}", field=key)
        try:
            return cls(**kwargs)
        except TypeError as exc:  # pragma: no cover - dataclass signature mismatch
            raise AdapterFormatError(f"bad adapter_config.json: {exc}") from exc

    @classmethod
    def from_json(cls, text: str | bytes) -> LoraConfig:
        return cls.from_peft_dict(parse_json(text, "adapter_config.json"))

    def to_peft_dict(self) -> dict[str, Any]:
        """PEFT-loadable config: PEFT's names and neutral values for what we do not use."""
        d = asdict(self)
        d.update(
            peft_type="LORA", bias="none", use_dora=False, inference_mode=True, init_lora_weights=True,
            layers_to_transform=None, layers_pattern=None,
        )
        if d["task_type"] is None:
            d.pop("task_type")
        if isinstance(d["target_modules"], list):
            d["target_modules"] = sorted(d["target_modules"])
        return d

    def to_json(self) -> str:
        # Top-level keys sorted (as PEFT writes them), but rank_pattern/alpha_pattern keep their order:
        # the first matching pattern wins, so sorting them could change a module's rank or alpha.
        d = self.to_peft_dict()
        return json.dumps({k: d[k] for k in sorted(d)}, indent=2)

    def target_description(self) -> str:
        t = self.target_modules
        return t if isinstance(t, str) else ",".join(sorted(t))


def exact_pattern(module_path: str) -> str:
    """A rank_pattern/alpha_pattern key matching this one module only: escaped, and anchored so that it does
    not also match longer paths ending the same way ("fc" would match "blocks.0.fc"). PEFT reads it alike."""
    return "^" + re.escape(module_path)


def _match_pattern(patterns: dict[str, Any], module_name: str, default: Any) -> Any:
    for pattern, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?(?:{pattern})", module_name):
            return value
    return default


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise AdapterFormatError(f"{name} must be a positive integer, got {value!r}")
    return value


def _finite_number(name: str, value: Any) -> float:
    try:  # float() of a huge JSON integer raises OverflowError rather than giving inf
        finite = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(float(value))
    except OverflowError:
        finite = False
    if not finite:
        raise AdapterFormatError(f"{name} must be a finite number, got {str(value)[:40]!r}")
    return value


def _regex(name: str, pattern: Any) -> str:
    if not isinstance(pattern, str):
        raise AdapterFormatError(f"{name} keys must be strings, got {pattern!r}")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise AdapterFormatError(f"{name} holds an invalid regex {pattern!r}: {exc}") from exc
    return pattern


def _targets(name: str, value: Any) -> list[str] | str:
    if isinstance(value, str):
        if value != ALL_LINEAR:
            _regex(name, value)
        return value
    if isinstance(value, (list, tuple, set)) and value and all(isinstance(v, str) and v for v in value):
        return sorted(set(value))
    raise AdapterFormatError(f"{name} must be a non-empty list of module names, a regex or 'all-linear', got {value!r}")
