"""The base model for a task (loaded by lora_common/base_loading.py, as the service loads it), and choosing
what trains: LoRA, the last layers, or everything.

    lora         every base weight frozen; LoRA A/B at the targets (+ the classification head, stored
                 through `modules_to_save` as PEFT's SEQ_CLS task does). Output: a PEFT adapter.
    last-layers  the last two transformer blocks and everything after them (pooler, final norm, head).
    full         every parameter. Both dense modes write a whole `save_pretrained` checkpoint.

The three reproduce the seed comparison (LoRA vs "last two layers" vs full fine-tuning); only `lora`
keeps the base bit-identical, and the trainer checks that it did.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from adapters import ALL_LINEAR, LoraConfig, LoraModel
from adapters.injection import resolve_targets
from lora_common.base_loading import checkpoint_dir, load_pretrained
from lora_common.base_loading import load_tokenizer as load_base_tokenizer

__all__ = [
    "MODES", "TASK_TYPES", "ADAPTER_NAME", "Setup", "default_targets", "load_model", "load_tokenizer", "head_paths",
    "setup_mode", "transformer_blocks", "fingerprint",
]

MODES = ("lora", "last-layers", "full")
TASK_TYPES = {"classify": "SEQ_CLS", "generate": "CAUSAL_LM", "embed": "FEATURE_EXTRACTION"}  # PEFT's names
ADAPTER_NAME = "default"  # the name inside LoraModel while training; it never reaches the saved keys
LAST_BLOCKS = 2  # the seed's "last two layers"

# Where PEFT would put LoRA by default for common architectures (attention query and value, as in
# Hu et al. 2021, §7.1). Anything else falls back to every Linear.
_DEFAULT_TARGETS: dict[str, list[str]] = {
    "bert": ["query", "value"], "roberta": ["query", "value"], "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"], "distilbert": ["q_lin", "v_lin"], "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"], "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"], "opt": ["q_proj", "v_proj"], "phi": ["q_proj", "v_proj"],
}
# Classification heads, as PEFT's SEQ_CLS adds them to modules_to_save; DistilBERT's pre_classifier is
# freshly initialised too, so it has to train (and be saved) with the head.
_HEADS = ("pre_classifier", "classifier", "score")


def default_targets(model: nn.Module) -> list[str] | str:
    return _DEFAULT_TARGETS.get(getattr(model.config, "model_type", ""), ALL_LINEAR)


def load_tokenizer(base: Path):
    """The base's tokenizer (lora_common's loader), refused when it cannot tokenize: training needs tokens."""
    checkpoint_dir(base)
    try:
        tok = load_base_tokenizer(base)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--base-model {base}: no usable tokenizer files ({exc})") from None
    # A directory without tokenizer files can still yield a tokenizer that maps every text to nothing;
    # training on that would learn nothing and still exit 0.
    if not tok("hello world", add_special_tokens=False)["input_ids"]:
        raise ValueError(f"--base-model {base}: its tokenizer turns text into no tokens; save the tokenizer "
                         "with the model (tokenizer.save_pretrained)")
    return tok


def load_model(base: Path, task: str, labels: list[str] | None = None) -> nn.Module:
    """float32 always: training in the checkpoint's half precision would lose small updates. A generate base
    must be a causal LM with a trained head (lora_common's loader refuses an encoder)."""
    if task != "classify":
        return load_pretrained(base, task, dtype=torch.float32)
    assert labels
    return load_pretrained(base, task, dtype=torch.float32, num_labels=len(labels),
                           id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)},
                           ignore_mismatched_sizes=True)  # a base with another label count gets a fresh head


def head_paths(model: nn.Module, task: str) -> list[str]:
    if task != "classify":
        return []
    children = dict(model.named_children())
    return [h for h in _HEADS if h in children]


def transformer_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The repeated blocks: the ModuleList of same-typed modules holding the most parameters."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            size = sum(p.numel() for p in module.parameters())
            if best is None or size > best[0]:
                best = (size, name, module)
    if best is None:
        raise ValueError(f"{type(model).__name__} has no list of transformer blocks; --mode last-layers needs one")
    return best[1], best[2]


def fingerprint(params: dict[str, torch.Tensor]) -> str:
    """sha256 over names and bytes: equal fingerprints mean bit-identical weights."""
    h = hashlib.sha256()
    for name in sorted(params):
        t = params[name].detach().contiguous()
        h.update(name.encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass
class Setup:
    mode: str
    params: list[nn.Parameter]  # what the optimiser updates
    lora: LoraModel | None = None
    config: LoraConfig | None = None
    targets: list[str] = field(default_factory=list)  # LoRA-wrapped modules, or the unfrozen prefixes
    added_parameters: int = 0  # parameters the model did not have before (LoRA A/B; head copies replace)

    @property
    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.params)


def setup_mode(model: nn.Module, task: str, mode: str, *, rank: int = 8, alpha: float = 16,
               targets: list[str] | str | None = None, dropout: float = 0.0, base_name: str | None = None) -> Setup:
    model.requires_grad_(False)  # first freeze everything, then open exactly what the mode trains
    if mode == "lora":
        return _setup_lora(model, task, rank, alpha, targets, dropout, base_name)
    if mode == "full":
        model.requires_grad_(True)
        opened = [""]
    elif mode == "last-layers":
        opened = _open_last_layers(model)
    else:
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    if task == "embed":  # mean pooling bypasses the pooler: it would count as trainable yet never learn
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] == "pooler":
                module.requires_grad_(False)
    return Setup(mode, [p for p in model.parameters() if p.requires_grad], targets=opened)


def _open_last_layers(model: nn.Module) -> list[str]:
    """The last LAST_BLOCKS blocks and every parameter registered after them. Hugging Face models
    register modules in forward order (embeddings, blocks, final norm/pooler, head), so "after the
    blocks" is the head side. named_parameters() lists a tied weight once, at its first owner (the
    embedding), so a tied lm_head stays frozen with it."""
    path, blocks = transformer_blocks(model)
    first = f"{path}.{len(blocks) - LAST_BLOCKS}." if len(blocks) > LAST_BLOCKS else f"{path}."
    opened: list[str] = []
    seen_first = False
    for name, p in model.named_parameters():
        seen_first = seen_first or name.startswith(first)
        if seen_first:
            p.requires_grad_(True)
            opened.append(name)
    return sorted({n.rsplit(".", 1)[0] for n in opened})


def _setup_lora(model: nn.Module, task: str, rank: int, alpha: float, targets: list[str] | str | None,
                dropout: float, base_name: str | None) -> Setup:
    heads = head_paths(model, task)
    targets = targets if targets else default_targets(model)
    # Resolving first tells us whether the targets are GPT-2 Conv1D layers, which PEFT records as
    # fan_in_fan_out=True (it would otherwise warn and flip it on load).
    resolved = resolve_targets(model, targets, modules_to_save=heads)
    conv1d = any(not isinstance(model.get_submodule(p), nn.Linear) for p in resolved)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=dropout,
                        fan_in_fan_out=conv1d, modules_to_save=heads or None, task_type=TASK_TYPES[task],
                        base_model_name_or_path=base_name)
    lm = LoraModel(model)
    wrapped = lm.add_trainable_adapter(ADAPTER_NAME, config)
    params = lm.trainable_parameters(ADAPTER_NAME)
    added = sum(p.numel() for p in params)
    # The head trains as a copy held by the modules_to_save wrapper, so the base's own head object stays as
    # loaded, and get_weights() returns it under PEFT's key (base_model.model.classifier.*).
    params += lm.add_trainable_modules(ADAPTER_NAME, heads)
    lm.set_adapter(ADAPTER_NAME)  # also points the new head wrappers at the adapter
    for p in params:
        p.requires_grad_(True)
    return Setup("lora", params, lora=lm, config=config, targets=wrapped, added_parameters=added)
