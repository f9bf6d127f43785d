"""Injection: which modules get LoRA (PEFT's rules), clear errors, and exact ejection."""

from __future__ import annotations

import pytest
import torch
from lora_fixtures import make_bert, make_bert_cls, make_gpt2, output, random_weights, tokens

from adapters import LoraConfig, LoraLinear, LoraModel, TargetNotFoundError
from adapters.injection import resolve_targets, set_submodule
from adapters.saved_modules import SavedModuleWrapper


def _tree(model: torch.nn.Module) -> list[tuple[str, int]]:
    return [(name, id(module)) for name, module in model.named_modules()]


def test_suffix_targets_follow_peft_rule():
    model = make_bert()
    found = resolve_targets(model, ["query", "value"])
    assert found == [f"encoder.layer.{i}.attention.self.{m}" for i in range(2) for m in ("query", "value")]
    # "dense" is a suffix of four kinds of layer; "self.query" a dotted suffix; "uery" matches nothing.
    assert len(resolve_targets(model, ["dense"])) == 2 * 3 + 1
    assert resolve_targets(model, ["layer.1.attention.self.query"]) == ["encoder.layer.1.attention.self.query"]
    with pytest.raises(TargetNotFoundError):
        resolve_targets(model, ["uery"])


def test_regex_target_must_match_the_whole_name():
    model = make_bert()
    assert resolve_targets(model, r".*layer\.1\..*\.(query|key)") == [
        "encoder.layer.1.attention.self.query", "encoder.layer.1.attention.self.key"]
    with pytest.raises(TargetNotFoundError):
        resolve_targets(model, r"query")  # a regex is a full match, not a search


def test_all_linear_skips_the_output_layer_and_modules_to_save():
    gpt2 = make_gpt2()
    found = resolve_targets(gpt2, "all-linear")
    assert "lm_head" not in found and len(found) == 2 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj (Conv1D)
    cls = make_bert_cls()
    found = resolve_targets(cls, "all-linear", modules_to_save=["classifier"])
    assert "classifier" not in found and "bert.pooler.dense" in found and len(found) == 2 * 6 + 1


def test_exclude_modules():
    found = resolve_targets(make_bert(), "all-linear", exclude=["pooler.dense", "output.dense"])
    assert not any(p.endswith(("pooler.dense", "output.dense")) for p in found) and len(found) == 2 * 4


def test_target_that_matches_nothing_is_a_clear_error_and_changes_nothing():
    model = make_gpt2()
    tree = _tree(model)
    lm = LoraModel(model)
    with pytest.raises(TargetNotFoundError, match="query") as err:
        lm.add_trainable_adapter("t", LoraConfig(target_modules=["query", "value"]))  # BERT names on GPT-2
    assert err.value.key == "target_modules"
    assert "match no Linear/Conv1D module" in str(err.value)
    assert lm.configs == {} and _tree(model) == tree


def test_target_that_is_not_linear_is_a_clear_error():
    with pytest.raises(TargetNotFoundError, match=r"wte \(Embedding\)"):
        resolve_targets(make_gpt2(), ["wte", "c_attn"])


def test_second_adapter_targets_already_wrapped_layers_not_their_insides():
    model = make_gpt2()
    lm = LoraModel(model)
    first = lm.add_trainable_adapter("a", LoraConfig(r=2, target_modules=["c_attn"]))
    second = lm.add_trainable_adapter("b", LoraConfig(r=3, target_modules="all-linear"))
    assert set(first) < set(second) and len(second) == 8
    layers = lm.lora_layers()
    assert set(layers) == set(second)  # no LoraLinear nested in another, none around lora_A/lora_B
    assert all(not isinstance(layer.base_layer, LoraLinear) for layer in layers.values())
    assert all(set(layers[p].lora_A) == {"a", "b"} for p in first)


def test_remove_and_eject_give_back_the_very_same_module_tree(tmp_path):
    model = make_bert_cls()
    tree = _tree(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = tokens(batch=3)
    before = output(model, ids)
    lm = LoraModel(model)
    lm.add_adapter("x", random_weights(model, 1, r=2, lora_alpha=4, target_modules=["query", "value"]))
    heads = random_weights(model, 2, r=2, lora_alpha=4, target_modules=["key"], modules_to_save=["classifier"])
    heads.modules_to_save = {"classifier.weight": torch.randn(3, 32), "classifier.bias": torch.randn(3)}
    lm.add_adapter("y", heads)
    assert isinstance(model.classifier, SavedModuleWrapper)
    lm.merge("y")
    with lm.route(["x", "y", None]):
        output(model, ids)

    lm.remove_adapter("y")  # the head and the "key" layers were y's alone: unwrapped again
    assert not isinstance(model.classifier, SavedModuleWrapper)
    assert set(lm.lora_layers()) == {f"bert.encoder.layer.{i}.attention.self.{m}" for i in range(2)
                                     for m in ("query", "value")}
    assert lm.eject() is model
    assert _tree(model) == tree
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    torch.testing.assert_close(output(model, ids), before, atol=0, rtol=0)


def test_set_submodule():
    model = make_bert()
    new = torch.nn.Linear(32, 32)
    set_submodule(model, "encoder.layer.0.attention.self.query", new)
    assert model.encoder.layer[0].attention.self.query is new


def test_target_that_matches_a_container_is_a_clear_error_not_skipped():
    """PEFT refuses a target naming a block (it cannot put LoRA on BertAttention); so do we, rather than
    silently wrapping only the other matches."""
    from lora_fixtures import make_bert

    with pytest.raises(TargetNotFoundError, match=r"attention \(BertAttention\)"):
        resolve_targets(make_bert(), ["attention", "query"])
    with pytest.raises(TargetNotFoundError, match=r"BertSelfAttention"):
        resolve_targets(make_bert(), r".*attention\.self(\.query)?")


def test_modules_inside_a_saved_head_take_no_lora():
    """RoBERTa's head holds Linears (classifier.dense, classifier.out_proj): with all-linear they stay out."""
    from lora_fixtures import make_roberta_cls

    found = resolve_targets(make_roberta_cls(), "all-linear", modules_to_save=["classifier"])
    assert found and not any(name.startswith("classifier") for name in found)
    assert "roberta.encoder.layer.0.attention.self.query" in found
