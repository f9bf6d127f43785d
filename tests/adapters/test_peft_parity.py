"""Against the real `peft`: its adapters run identically here, and ours load in PEFT.

Adapters are made by PEFT with random non-zero A and B (`init_lora_weights=False`), so a wrong scaling,
orientation or target shows up in the outputs. Tolerance: fp32, atol 1e-5.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from lora_fixtures import make_bert, make_bert_cls, make_gpt2, make_roberta_cls, output, peft_adapter
from peft import PeftModel
from safetensors.torch import load_file

from adapters import LoraConfig, LoraModel, LoraWeights, compose, load_peft_dir, save_peft_dir
from adapters.weights import PREFIX

ATOL = 1e-5

CASES = {
    # GPT-2: Conv1D everywhere (fan_in_fan_out), per-module rank and alpha, rsLoRA.
    "gpt2-conv1d-patterns-rslora": (make_gpt2, dict(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True, use_rslora=True,
        rank_pattern={"c_fc": 2, "h.1.attn.c_proj": 6}, alpha_pattern={"c_attn": 3.0})),
    # BERT encoder: nn.Linear, "all-linear" (pooler included), plain alpha / r.
    "bert-all-linear": (make_bert, dict(r=8, lora_alpha=16, target_modules="all-linear")),
    # BERT classifier: SEQ_CLS puts the classifier head in modules_to_save (stored as full tensors).
    "bert-seqcls-modules-to-save": (make_bert_cls, dict(
        task_type="SEQ_CLS", r=4, lora_alpha=4, target_modules=["query", "value", "dense"],
        rank_pattern={"value": 2}, alpha_pattern={"layer.1.attention.self.query": 10.0})),
    # RoBERTa classifier: the head nests Linears, saved as classifier.dense.* and classifier.out_proj.*.
    "roberta-seqcls-nested-head": (make_roberta_cls, dict(
        task_type="SEQ_CLS", r=4, lora_alpha=64, target_modules=["query", "key", "value"])),
}


@pytest.mark.parametrize("case", list(CASES))
def test_peft_made_adapter_gives_same_outputs_unmerged_and_merged(case, tmp_path, ids):
    build, config = CASES[case]
    base_out = output(build(), ids)
    pm = peft_adapter(build(), tmp_path, **config)
    want = output(pm, ids)
    assert not torch.allclose(want, base_out, atol=1e-3), "the adapter must change the outputs"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.merge_adapter()
    want_merged = output(pm, ids)

    model = build()
    lm = LoraModel(model)
    lm.add_adapter("a", load_peft_dir(tmp_path))
    lm.set_adapter("a")
    torch.testing.assert_close(output(model, ids), want, atol=ATOL, rtol=0)
    with lm.route(["a"] * ids.shape[0]):  # the mixed-batch path gives the same
        torch.testing.assert_close(output(model, ids), want, atol=ATOL, rtol=0)
    lm.merge("a")
    got_merged = output(model, ids)
    torch.testing.assert_close(got_merged, want, atol=ATOL, rtol=0)
    torch.testing.assert_close(got_merged, want_merged, atol=ATOL, rtol=0)
    lm.unmerge()
    lm.set_adapter(None)
    torch.testing.assert_close(output(model, ids), base_out, atol=0, rtol=0)


def _random_ours(model: torch.nn.Module, config: LoraConfig, seed: int = 5) -> LoraWeights:
    """An adapter trained in our library, with B made non-zero so that it changes the outputs."""
    lm = LoraModel(model)
    lm.add_trainable_adapter("t", config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in lm.trainable_parameters("t"):
            p.normal_(0, 0.3)
    weights = lm.get_weights("t")
    lm.eject()
    return weights


@pytest.mark.parametrize("case", ["gpt2", "bert"])
def test_our_adapter_loads_in_peft_with_same_outputs(case, tmp_path, ids):
    build = {"gpt2": make_gpt2, "bert": make_bert}[case]
    config = LoraConfig(r=4, lora_alpha=6, target_modules="all-linear", use_rslora=(case == "bert"),
                        fan_in_fan_out=(case == "gpt2"), rank_pattern={"layer.0.attention.self.key": 2, "c_fc": 3})
    weights = _random_ours(build(), config)
    save_peft_dir(weights, tmp_path)

    model = build()
    lm = LoraModel(model)
    lm.add_adapter("a", load_peft_dir(tmp_path))
    lm.set_adapter("a")
    ours = output(model, ids)
    assert not torch.allclose(ours, output(build(), ids), atol=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(build(), str(tmp_path)).eval()
    torch.testing.assert_close(output(pm, ids), ours, atol=ATOL, rtol=0)


def test_our_classifier_adapter_with_head_loads_in_peft(tmp_path, ids):
    model = make_bert_cls()
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS",
                        modules_to_save=["classifier"])
    weights = _random_ours(model, config)
    torch.manual_seed(9)
    weights.modules_to_save = {"classifier.weight": torch.randn(3, 32), "classifier.bias": torch.randn(3)}
    save_peft_dir(weights, tmp_path)

    fresh = make_bert_cls()
    lm = LoraModel(fresh)
    lm.add_adapter("a", load_peft_dir(tmp_path))
    lm.set_adapter("a")
    ours = output(fresh, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(make_bert_cls(), str(tmp_path)).eval()
    torch.testing.assert_close(output(pm, ids), ours, atol=ATOL, rtol=0)


def test_composed_adapter_loads_in_peft(tmp_path, ids):
    """compose() writes exact-path rank/alpha patterns; PEFT must read them the way we do."""
    x = _random_ours(make_gpt2(), LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"]), seed=1)
    y = _random_ours(make_gpt2(), LoraConfig(r=3, lora_alpha=3, target_modules=["c_attn", "c_fc"]), seed=2)
    save_peft_dir(compose([(x, 0.7), (y, -1.3)]).weights, tmp_path)
    model = make_gpt2()
    lm = LoraModel(model)
    lm.add_adapter("c", load_peft_dir(tmp_path))
    lm.set_adapter("c")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(make_gpt2(), str(tmp_path)).eval()
    torch.testing.assert_close(output(pm, ids), output(model, ids), atol=ATOL, rtol=0)


def test_byte_level_format_matches_peft(tmp_path):
    """Same keys (no adapter name), same tensors, a config PEFT reads back to the same hyperparameters."""
    config = dict(r=4, lora_alpha=8, target_modules=["query", "value"], rank_pattern={"value": 2})
    peft_adapter(make_bert(), tmp_path / "peft", **config)
    peft_tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")

    save_peft_dir(load_peft_dir(tmp_path / "peft"), tmp_path / "ours")
    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert sorted(ours) == sorted(peft_tensors)
    for key, tensor in ours.items():
        assert key.startswith(PREFIX) and key.endswith((".lora_A.weight", ".lora_B.weight"))
        assert ".default." not in key
        assert torch.equal(tensor, peft_tensors[key])
    assert "base_model.model.encoder.layer.0.attention.self.query.lora_A.weight" in ours
    assert ours["base_model.model.encoder.layer.1.attention.self.value.lora_B.weight"].shape == (32, 2)

    from peft import LoraConfig as PeftLoraConfig
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reread = PeftLoraConfig.from_pretrained(str(tmp_path / "ours"))
    assert (reread.r, reread.lora_alpha, reread.rank_pattern) == (4, 8, {"value": 2})
    assert set(reread.target_modules) == {"query", "value"}
    assert (reread.use_dora, reread.bias, reread.use_rslora) == (False, "none", False)
    on_disk = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert on_disk["peft_type"] == "LORA"
