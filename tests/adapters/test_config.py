"""LoraConfig: PEFT's hyperparameter rules, and a clear error naming the field for anything else."""

from __future__ import annotations

import json
import math

import pytest

from adapters import AdapterFormatError, LoraConfig, UnsupportedAdapterError


def test_scaling_is_alpha_over_r_or_over_sqrt_r():
    assert LoraConfig(r=8, lora_alpha=16).scaling_for("q") == 2.0
    assert LoraConfig(r=16, lora_alpha=8, use_rslora=True).scaling_for("q") == 8 / math.sqrt(16)


def test_rank_and_alpha_patterns_follow_peft():
    c = LoraConfig(r=8, lora_alpha=16, rank_pattern={"layer.0.attn.q": 2, "q": 4},
                   alpha_pattern={r"layer\.[01]\.attn\.v": 3.0})
    assert c.rank_for("model.layer.0.attn.q") == 2  # the first matching pattern wins
    assert c.rank_for("model.layer.1.attn.q") == 4
    assert c.rank_for("model.layer.1.attn.xq") == 8  # a pattern matches whole dotted components
    assert c.rank_for("q") == 4
    assert c.alpha_for("model.layer.1.attn.v") == 3.0 and c.alpha_for("model.layer.2.attn.v") == 16
    assert c.scaling_for("model.layer.0.attn.q") == 16 / 2
    assert c.scaling_for("model.layer.0.attn.v", rank=4) == 3.0 / 4


def test_peft_dict_round_trip_keeps_pattern_order():
    c = LoraConfig(r=4, lora_alpha=8, target_modules=["v", "q"], rank_pattern={"z": 1, "a": 2},
                   alpha_pattern={"z": 1.0, "a": 2.0}, modules_to_save=["classifier"], task_type="SEQ_CLS")
    data = json.loads(c.to_json())
    assert list(data) == sorted(data)
    assert list(data["rank_pattern"]) == ["z", "a"]
    assert data["peft_type"] == "LORA" and data["use_dora"] is False and data["bias"] == "none"
    assert LoraConfig.from_json(c.to_json()) == c


def test_peft_neutral_fields_and_unknown_null_fields_are_accepted():
    c = LoraConfig.from_peft_dict({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q"], "use_dora": False, "lora_bias": False,
        "bias": "none", "layers_to_transform": None, "megatron_core": "megatron.core", "loftq_config": {},
        "some_future_config": None, "qalora_group_size": 16, "runtime_config": {"ephemeral_gpu_offload": False},
    })
    assert (c.r, c.lora_alpha, c.target_modules) == (4, 8, ["q"])


@pytest.mark.parametrize(("field", "value"), [
    ("use_dora", True), ("lora_bias", True), ("bias", "all"), ("bias", "lora_only"),
    ("layers_to_transform", [0]), ("target_parameters", ["experts.w"]), ("trainable_token_indices", [1, 2]),
    ("layer_replication", [[0, 1]]), ("peft_type", "IA3"), ("some_future_feature", True),
])
def test_unsupported_fields_are_refused_by_name(field, value):
    with pytest.raises(UnsupportedAdapterError, match=field) as err:
        LoraConfig.from_peft_dict({"r": 4, "target_modules": ["q"], field: value})
    assert err.value.key == field


@pytest.mark.parametrize("data", [
    ["a", "list"], "a string", 8, None,
    {"r": "8"}, {"r": 0}, {"r": -1}, {"r": True}, {"r": 2.5},
    {"lora_alpha": "16"}, {"lora_alpha": float("nan")},
    {"lora_dropout": 1.0}, {"lora_dropout": "0.1"},
    {"use_rslora": "yes"}, {"fan_in_fan_out": 1},
    {"target_modules": []}, {"target_modules": 5}, {"target_modules": [""]}, {"target_modules": "(unclosed"},
    {"rank_pattern": ["q"]}, {"rank_pattern": {"q": "2"}}, {"rank_pattern": {"(": 2}}, {"alpha_pattern": {"q": None}},
    {"modules_to_save": "classifier"}, {"modules_to_save": [1]},
])
def test_wrong_types_are_format_errors(data):
    with pytest.raises(AdapterFormatError):
        LoraConfig.from_peft_dict(data)


def test_field_is_named_in_the_message():
    with pytest.raises(AdapterFormatError, match=r"r must be a positive integer, got '8'"):
        LoraConfig.from_peft_dict({"r": "8"})
    with pytest.raises(AdapterFormatError, match="not valid JSON"):
        LoraConfig.from_json(b"{")


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "corda", "loftq", "lora_ga", "something_new"])
def test_inits_that_rewrite_the_base_weights_are_refused(init):
    """PiSSA/OLoRA/CorDA/LoftQ/LoRA-GA adapters are only valid on the base they modified at init."""
    with pytest.raises(UnsupportedAdapterError, match="init_lora_weights") as err:
        LoraConfig.from_peft_dict({"r": 4, "target_modules": ["q"], "init_lora_weights": init})
    assert err.value.key == "init_lora_weights"


@pytest.mark.parametrize("init", [True, False, "gaussian", "eva", "orthogonal"])
def test_inits_that_only_choose_a_and_b_are_accepted(init):
    assert LoraConfig.from_peft_dict({"r": 4, "target_modules": ["q"], "init_lora_weights": init}).r == 4


@pytest.mark.parametrize(("field", "value"), [
    ("use_bdlora", True), ("bdlora_config", {"blocks": 2}), ("arrow_config", {"top_k": 3})])
def test_bdlora_and_arrow_are_refused_when_set(field, value):
    with pytest.raises(UnsupportedAdapterError, match=field):
        LoraConfig.from_peft_dict({"r": 4, "target_modules": ["q"], field: value})
    assert LoraConfig.from_peft_dict({"r": 4, "target_modules": ["q"], field: None}).r == 4


def test_empty_exclude_modules_means_none():
    assert LoraConfig.from_peft_dict({"r": 4, "target_modules": ["q"], "exclude_modules": []}).exclude_modules is None


@pytest.mark.parametrize("data", [
    {"task_type": 5}, {"task_type": ["SEQ_CLS"]}, {"base_model_name_or_path": {"a": 1}},
    {"lora_alpha": 10 ** 400}, {"alpha_pattern": {"q": -(10 ** 400)}},
])
def test_wrong_types_and_overflowing_numbers_are_format_errors(data):
    with pytest.raises(AdapterFormatError):
        LoraConfig.from_json(json.dumps({"r": 4, "target_modules": ["q"], **data}))
