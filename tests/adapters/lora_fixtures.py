"""Tiny seeded Hugging Face models and PEFT-made adapters shared by the adapters/ tests (`from lora_fixtures import …`).

Everything is built locally from configs (no download) and small enough that the whole directory runs
in well under a minute on two cores. Sizes are deliberately non-square (in != out, odd intermediate
sizes) so that a transposed A or B, or a Conv1D handled as a Linear, fails loudly.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    RobertaConfig,
    RobertaForSequenceClassification,
)

VOCAB = 97
NUM_LABELS = 3


def _gpt2_config() -> GPT2Config:
    return GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4, n_inner=48,
                      bos_token_id=0, eos_token_id=0)


def _bert_config() -> BertConfig:
    return BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=37, max_position_embeddings=32, num_labels=NUM_LABELS)


def make_gpt2(seed: int = 0, dtype: torch.dtype = torch.float32) -> GPT2LMHeadModel:
    """GPT-2 with transformers' Conv1D layers (weight stored (in, out), PEFT's fan_in_fan_out)."""
    torch.manual_seed(seed)
    return GPT2LMHeadModel(_gpt2_config()).to(dtype).eval()


def make_bert(seed: int = 0, dtype: torch.dtype = torch.float32) -> BertModel:
    torch.manual_seed(seed)
    return BertModel(_bert_config()).to(dtype).eval()


def make_bert_cls(seed: int = 0, dtype: torch.dtype = torch.float32) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(_bert_config()).to(dtype).eval()


def make_roberta_cls(seed: int = 0, dtype: torch.dtype = torch.float32) -> RobertaForSequenceClassification:
    """RoBERTa's head nests two Linears (classifier.dense, classifier.out_proj) under one modules_to_save entry."""
    torch.manual_seed(seed)
    config = RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=37, max_position_embeddings=40, num_labels=NUM_LABELS, pad_token_id=1)
    return RobertaForSequenceClassification(config).to(dtype).eval()


def tokens(batch: int = 3, length: int = 7, seed: int = 123) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g)


def output(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The one tensor a test compares: logits for LM/classifier heads, last hidden state for encoders."""
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def peft_adapter(model: torch.nn.Module, path: Path, seed: int = 1, **config) -> torch.nn.Module:
    """Wrap `model` with a PEFT LoRA adapter with random non-zero A and B, save it to `path`.

    Returns the PeftModel (in eval mode). `model` itself is modified in place, as PEFT does."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out auto-fix for Conv1D, etc.
        pm = get_peft_model(model, LoraConfig(init_lora_weights=False, **config))
        pm.save_pretrained(str(path))
    return pm.eval()


def random_weights(model: torch.nn.Module, seed: int, scale: float = 0.2, dtype: torch.dtype = torch.float32,
                   **config):
    """A LoraWeights with random non-zero A (r, in) and B (out, r) at the config's targets of `model`."""
    from adapters import LoraConfig, LoraWeights
    from adapters.injection import resolve_targets
    from adapters.validation import base_weight_shape

    cfg = LoraConfig(**config)
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for path in resolve_targets(model, cfg.target_modules):
        fan_in, fan_out = base_weight_shape(model.get_submodule(path))
        r = cfg.rank_for(path)
        lora[path] = ((torch.randn(r, fan_in, generator=g) * scale).to(dtype),
                      (torch.randn(fan_out, r, generator=g) * scale).to(dtype))
    return LoraWeights(cfg, lora)
