"""Models and adapters for the GPU check, built from configs with random init: nothing is downloaded.

    llama(size)   LlamaForCausalLM: "1b" is TinyLlama's shape (hidden 2048, 22 layers, intermediate 5632,
                  32 heads, 4 KV heads: about 1B parameters with a small vocabulary); "tiny" for CPU rehearsal
    gpt2(size)    GPT2LMHeadModel: "small" is GPT2Config() (124M, Conv1D layers); "tiny" for CPU rehearsal
    peft_with_adapters(model, n, rank)   PEFT's own model with n random adapters on every linear layer
    ours_from_peft(pm, name)             the very same A and B as our LoraWeights

Shared by benchmarks/gpu/bench_gpu.py and tests/cuda/, so the rehearsal on the CPU and the run on the GPU build
the same architectures through the same code, only smaller.
"""

from __future__ import annotations

import contextlib
import copy
import random
from collections.abc import Iterator

import torch
from torch import nn

import adapters as A

__all__ = ["LLAMA_SIZES", "GPT2_SIZES", "llama", "gpt2", "peft_with_adapters", "ours_from_peft", "byte_tokenizer",
           "count_parameters", "loaded_base", "random_adapter", "engine_settings"]

# Model widths by size name; "1b" and "small" run on the GPU, "tiny" rehearses them on the CPU.
LLAMA_SIZES = {
    "1b": dict(hidden_size=2048, num_hidden_layers=22, intermediate_size=5632, num_attention_heads=32,
               num_key_value_heads=4),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=160, num_attention_heads=4,
                 num_key_value_heads=2),
}
GPT2_SIZES = {
    "small": dict(n_embd=768, n_layer=12, n_head=12),
    "tiny": dict(n_embd=64, n_layer=2, n_head=4, vocab_size=2048, n_positions=256, bos_token_id=0, eos_token_id=0),
}
WORDS = ("the adapter model serves many small tasks while one frozen base stays on the device and every request "
         "names its own low rank update so batches mix them freely").split()


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Parameters are created in `dtype` directly: a 1B model never exists in float32 on the GPU."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def llama(size: str, device: str, dtype: torch.dtype, vocab_size: int = 2048, seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, max_position_embeddings=1024, tie_word_embeddings=False,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0, **LLAMA_SIZES[size])
    with torch.device(device), _default_dtype(dtype):  # random init straight on the device, in its dtype
        model = LlamaForCausalLM(config)
    return model.eval().requires_grad_(False)


def gpt2(size: str, device: str, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    with torch.device(device), _default_dtype(dtype):
        model = GPT2LMHeadModel(GPT2Config(**GPT2_SIZES[size]))
    return model.eval().requires_grad_(False)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def peft_with_adapters(model: nn.Module, n: int, rank: int, seed: int = 0) -> nn.Module:
    """PEFT's model over a deep copy of `model`, with n random adapters a0..a{n-1} on every linear layer but the
    output head (B random too, `init_lora_weights=False`, so every adapter changes the outputs)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", init_lora_weights=False)
    pm = get_peft_model(copy.deepcopy(model), config, adapter_name="a0")
    for i in range(1, n):
        pm.add_adapter(f"a{i}", config)
    # Small B, as trained adapters have: the update stays well inside bf16's range and the logits stay finite.
    with torch.no_grad():
        for module in pm.modules():
            if isinstance(getattr(module, "lora_B", None), nn.ModuleDict):
                for linear in module.lora_B.values():
                    linear.weight.mul_(0.1)
    return pm.eval()


def ours_from_peft(pm: nn.Module, name: str) -> A.LoraWeights:
    """The A and B PEFT holds for adapter `name`, as our LoraWeights (scaling alpha/r as PEFT's)."""
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    rank = alpha = 0
    fan_in_fan_out = False
    for path, module in pm.named_modules():
        if isinstance(getattr(module, "lora_A", None), nn.ModuleDict) and name in module.lora_A:
            # On the host, as an uploaded adapter arrives: add_adapter moves it to the base's device.
            lora[path.removeprefix("base_model.model.")] = (module.lora_A[name].weight.detach().to("cpu", copy=True),
                                                            module.lora_B[name].weight.detach().to("cpu", copy=True))
            rank, alpha = module.r[name], module.lora_alpha[name]
            fan_in_fan_out = fan_in_fan_out or bool(getattr(module, "fan_in_fan_out", False))
    targets = sorted({p.rsplit(".", 1)[-1] for p in lora})
    config = A.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, fan_in_fan_out=fan_in_fan_out)
    return A.LoraWeights(config, lora)


def byte_tokenizer(vocab_size: int = 2048):
    """A byte-level BPE trained here on a few generated lines, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    rng = random.Random(0)
    tok.train_from_iterator([" ".join(rng.choices(WORDS, k=20)) for _ in range(500)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    return fast


def loaded_base(model: nn.Module, tokenizer, device: str, dtype: torch.dtype, stop: bool = False):
    """The engine's view of an in-memory causal LM. stop=False serves it with no stop token, so every request
    generates exactly max_tokens (a random model says EOS at random): throughput figures count the same work."""
    from adapters.footprint import model_footprint
    from service.base_model import LoadedBase

    params, nbytes = model_footprint(model)
    stops = frozenset({tokenizer.eos_token_id}) if stop else frozenset()
    return LoadedBase(model, tokenizer, "generate", "gpu-check", torch.device(device), dtype, None, params, nbytes,
                      int(model.config.max_position_embeddings), stops)


def random_adapter(model: nn.Module, rank: int, seed: int, scale: float = 0.02) -> A.LoraWeights:
    """Random rank-`rank` LoRA on every linear layer but the output head, in PEFT's orientation."""
    gen = torch.Generator().manual_seed(seed)
    lora, targets = {}, set()
    for path, module in model.named_modules():
        if type(module) is nn.Linear and not path.endswith("lm_head"):
            out_f, in_f = module.weight.shape
            a = torch.randn(rank, in_f, generator=gen) * scale  # (r, in)
            lora[path] = (a, torch.randn(out_f, rank, generator=gen) * scale)  # B (out, r)
            targets.add(path.rsplit(".", 1)[-1])
    return A.LoraWeights(A.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=sorted(targets)), lora)


def engine_settings(**overrides):
    """The Engine's config (no HTTP layer in between)."""
    from service.engine.config import EngineConfig

    values = dict(max_rank=64, host_cache_bytes=1 << 30, merge_policy="never", merge_kernel="auto",
                  device_cache_adapters=32, device_cache_bytes=1 << 30, max_batch_size=64, max_wait_ms=2.0)
    values.update(overrides)
    return EngineConfig(**values)
