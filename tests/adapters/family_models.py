"""Tiny seeded models of each architecture family the mixed-batch path must serve, built from configs (no download).

Each family is there for a way its layers see their inputs: GPT-2's Conv1D (weight (in, out)); Llama's grouped
query attention; Qwen2's q/k/v biases; Mistral's and Gemma 2's sliding windows (and Gemma 2's soft-capping);
Phi-3's fused qkv_proj / gate_up_proj; GPT-NeoX's fused query_key_value; OPT, whose decoder layer flattens
(B, T, H) to (B·T, H) before fc1/fc2 (and projects embeddings in and out); Qwen2-MoE, whose shared expert
also runs on (B·T, H). Sizes are small and non-square (intermediate 48 against hidden 32).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Family", "DECODERS", "build"]

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, POSITIONS = 32, 2, 4, 2, 48, 64


@dataclass(frozen=True)
class Family:
    name: str
    make: Callable[[int, int], nn.Module]  # (vocab size, EOS id) -> an untrained causal LM
    # Its generation cache is a plain DynamicCache, so requests join a running decode; sliding-window caches
    # cannot be spliced (service/engine/decoding.py), and newcomers wait for the running rows to end.
    joins: bool = True


def _gpt2(vocab: int, eos: int) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=FFN,
                                      n_positions=POSITIONS, bos_token_id=eos, eos_token_id=eos))


def _llama(vocab: int, eos: int) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**_common(vocab, eos)))


def _qwen2(vocab: int, eos: int) -> nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(**_common(vocab, eos)))  # q/k/v carry biases


def _mistral(vocab: int, eos: int) -> nn.Module:
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(**_common(vocab, eos), sliding_window=4))


def _gemma2(vocab: int, eos: int) -> nn.Module:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    return Gemma2ForCausalLM(Gemma2Config(**_common(vocab, eos), head_dim=HIDDEN // HEADS, sliding_window=4,
                                          query_pre_attn_scalar=HIDDEN // HEADS))


def _phi3(vocab: int, eos: int) -> nn.Module:
    from transformers import Phi3Config, Phi3ForCausalLM

    return Phi3ForCausalLM(Phi3Config(**_common(vocab, eos), original_max_position_embeddings=POSITIONS))


def _gpt_neox(vocab: int, eos: int) -> nn.Module:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=vocab, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                            num_attention_heads=HEADS, intermediate_size=FFN, rotary_pct=0.5,
                                            max_position_embeddings=POSITIONS, bos_token_id=eos, eos_token_id=eos))


def _opt(vocab: int, eos: int) -> nn.Module:
    from transformers import OPTConfig, OPTForCausalLM

    # word_embed_proj_dim != hidden_size adds project_in / project_out, as in OPT-350m.
    return OPTForCausalLM(OPTConfig(vocab_size=vocab, hidden_size=HIDDEN, ffn_dim=FFN, num_hidden_layers=LAYERS,
                                    num_attention_heads=HEADS, max_position_embeddings=POSITIONS,
                                    word_embed_proj_dim=HIDDEN // 2, pad_token_id=eos, bos_token_id=eos,
                                    eos_token_id=eos))


def _qwen2_moe(vocab: int, eos: int) -> nn.Module:
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    # The routed experts are 3-D Parameters (no LoRA targets); the shared expert and its gate are Linears.
    return Qwen2MoeForCausalLM(Qwen2MoeConfig(**_common(vocab, eos), num_experts=4, num_experts_per_tok=2,
                                              moe_intermediate_size=16, shared_expert_intermediate_size=24))


def _common(vocab: int, eos: int) -> dict:
    return dict(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=POSITIONS,
                pad_token_id=eos, bos_token_id=eos, eos_token_id=eos)


DECODERS = [Family("gpt2", _gpt2), Family("llama-gqa", _llama), Family("qwen2-qkv-bias", _qwen2),
            Family("mistral-sliding", _mistral, joins=False), Family("gemma2", _gemma2, joins=False),
            Family("phi3-fused", _phi3), Family("gpt-neox", _gpt_neox), Family("opt", _opt),
            Family("qwen2-moe", _qwen2_moe)]


def build(family: Family, vocab: int, eos: int, seed: int = 0) -> nn.Module:
    """The family's model with seeded random weights, in eval mode."""
    torch.manual_seed(seed)
    return family.make(vocab, eos).eval()
