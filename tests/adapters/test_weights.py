"""LoraWeights: PEFT's keys in, PEFT's keys out, and refusals of keys that are not plain LoRA."""

from __future__ import annotations

import pytest
import torch

from adapters import AdapterFormatError, LoraConfig, LoraWeights, UnknownAdapterError, UnsupportedAdapterError

P = "base_model.model.enc.q"


def _sd(**extra) -> dict[str, torch.Tensor]:
    return {f"{P}.lora_A.weight": torch.randn(2, 4), f"{P}.lora_B.weight": torch.randn(3, 2), **extra}


def test_state_dict_round_trip_and_facts():
    config = LoraConfig(r=2, lora_alpha=4, modules_to_save=["head"])
    sd = _sd(**{"base_model.model.head.weight": torch.randn(5, 3)})
    w = LoraWeights.from_state_dict(config, sd)
    assert w.targets() == ["enc.q"] and w.rank_of("enc.q") == 2 and w.max_rank() == 2
    assert w.scaling_for("enc.q") == 2.0
    assert w.num_parameters() == 8 + 6 + 15 and w.nbytes() == 4 * 29
    assert sorted(w.to_state_dict()) == sorted(sd)
    half = w.to(dtype=torch.bfloat16)
    assert half.lora["enc.q"][0].dtype == torch.bfloat16 and half.modules_to_save["head.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize(("key", "error", "match"), [
    (f"{P}.lora_magnitude_vector", UnsupportedAdapterError, "use_dora"),
    (f"{P}.lora_B.bias", UnsupportedAdapterError, "lora_bias"),
    ("base_model.model.emb.lora_embedding_A", UnsupportedAdapterError, "embedding LoRA"),
    (f"{P}.lora_A.default.weight", AdapterFormatError, "adapter name"),
    ("model.enc.k.lora_A.weight", AdapterFormatError, "does not start with"),
    ("base_model.model.enc.layer_norm.weight", AdapterFormatError, "neither a LoRA matrix"),
])
def test_keys_that_are_not_plain_lora_are_refused_by_name(key, error, match):
    with pytest.raises(error, match=match) as err:
        LoraWeights.from_state_dict(LoraConfig(r=2), _sd(**{key: torch.randn(2)}))
    assert err.value.key == key


def test_missing_half_and_empty():
    sd = _sd()
    del sd[f"{P}.lora_B.weight"]
    with pytest.raises(AdapterFormatError, match="missing") as err:
        LoraWeights.from_state_dict(LoraConfig(r=2), sd)
    assert err.value.key == f"{P}.lora_B.weight"
    with pytest.raises(AdapterFormatError, match="no tensors"):
        LoraWeights.from_state_dict(LoraConfig(r=2), {})


def test_unknown_adapter_error_reads_as_its_message():
    err = UnknownAdapterError("adapter 'x' is not resident", key="x")
    assert str(err) == "adapter 'x' is not resident" and isinstance(err, KeyError)


def test_nested_modules_to_save_keys_belong_to_their_module():
    """RoBERTa's head is `classifier.dense` + `classifier.out_proj`: PEFT saves every tensor under the entry."""
    config = LoraConfig(r=2, modules_to_save=["classifier"])
    nested = {"base_model.model.classifier.dense.weight": torch.randn(4, 4),
              "base_model.model.roberta.classifier.out_proj.bias": torch.randn(2)}
    w = LoraWeights.from_state_dict(config, _sd(**nested))
    assert sorted(w.modules_to_save) == ["classifier.dense.weight", "roberta.classifier.out_proj.bias"]
    with pytest.raises(AdapterFormatError, match="neither a LoRA matrix"):  # a name that only starts alike
        LoraWeights.from_state_dict(config, _sd(**{"base_model.model.classifier_x.weight": torch.randn(2)}))
