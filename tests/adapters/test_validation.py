"""Every refusal before a weight is touched: unsupported PEFT features, and adapters that do not fit."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from lora_fixtures import make_bert, make_bert_cls, make_gpt2, output, peft_adapter, random_weights, tokens

from adapters import (
    AdapterFormatError,
    AdapterMismatchError,
    AdapterTooLargeError,
    LoraModel,
    LoraWeights,
    UnsupportedAdapterError,
    load_peft_dir,
    validate_adapter,
)

KEY = "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"


# --------------------------------------------------------------------- unsupported features, made by PEFT itself
@pytest.mark.parametrize(("feature", "config", "field", "key_part"), [
    ("dora", dict(use_dora=True), "use_dora", "lora_magnitude_vector"),
    ("lora_bias", dict(lora_bias=True), "lora_bias", "lora_B.bias"),
    ("bias_all", dict(bias="all"), "bias", ".bias"),  # every bias of the model is saved
    ("embedding", dict(target_modules=["wte", "c_attn"]), None, "wte.lora_embedding_"),
])
def test_peft_features_we_do_not_implement_are_refused_by_name(tmp_path, feature, config, field, key_part):
    config = {"target_modules": ["c_attn"], **config}
    peft_adapter(make_gpt2(), tmp_path, r=2, lora_alpha=4, **config)
    if field is not None:
        with pytest.raises(UnsupportedAdapterError, match=field) as err:
            load_peft_dir(tmp_path)
        assert err.value.key == field
        # Even with the config field scrubbed, the tensors themselves give the feature away.
        path = tmp_path / "adapter_config.json"
        data = json.loads(path.read_text())
        data.update(use_dora=False, lora_bias=False, bias="none")
        path.write_text(json.dumps(data))
    with pytest.raises((UnsupportedAdapterError, AdapterFormatError)) as err:
        load_peft_dir(tmp_path)
    assert key_part in err.value.key


# --------------------------------------------------------------------- the adapter must fit the base model
def _weights(**overrides) -> tuple[torch.nn.Module, LoraWeights]:
    model = make_gpt2()
    w = random_weights(model, 1, r=4, lora_alpha=8, target_modules=["c_attn"], **overrides)
    return model, w


def _refused(model, weights, error, key, **kwargs):
    with pytest.raises(error) as err:
        validate_adapter(model, weights, **kwargs)
    assert err.value.key == key, err.value
    assert key in str(err.value)


def test_unknown_module():
    model, w = _weights()
    w.lora["transformer.h.7.attn.c_attn"] = w.lora.pop("transformer.h.0.attn.c_attn")
    _refused(model, w, AdapterMismatchError, "base_model.model.transformer.h.7.attn.c_attn.lora_A.weight")


def test_module_that_is_not_linear():
    model, w = _weights()
    w.lora["transformer.ln_f"] = (torch.randn(4, 32), torch.randn(32, 4))
    _refused(model, w, AdapterMismatchError, "base_model.model.transformer.ln_f.lora_A.weight")


def test_tensors_the_config_does_not_target_are_refused_as_peft_would_ignore_them():
    """PEFT injects by the config and drops tensors for modules it did not inject: applying them anyway
    would make our outputs differ from PEFT's for the same files."""
    model, w = _weights()
    w.lora["transformer.h.0.attn.c_proj"] = (torch.randn(4, 32), torch.randn(32, 4))  # config: c_attn only
    _refused(model, w, AdapterMismatchError, "base_model.model.transformer.h.0.attn.c_proj.lora_A.weight")
    model, w = _weights(exclude_modules=["transformer.h.0.attn.c_attn"])
    with pytest.raises(AdapterMismatchError, match="exclude_modules") as err:
        validate_adapter(model, w)
    assert err.value.key == KEY
    for targets in (r".*\.c_attn", "all-linear", ["attn.c_attn"]):  # a regex, all-linear, a longer suffix
        model, w = _weights()
        w.config.target_modules = targets
        assert set(validate_adapter(model, w).lora) == set(w.lora)


def test_wrong_shapes():
    model, w = _weights()
    a, b = w.lora["transformer.h.0.attn.c_attn"]
    w.lora["transformer.h.0.attn.c_attn"] = (a[:, :-1], b)
    _refused(model, w, AdapterMismatchError, KEY)
    w.lora["transformer.h.0.attn.c_attn"] = (a, b.T.contiguous())  # (r, out) instead of (out, r)
    _refused(model, w, AdapterMismatchError, KEY.replace("lora_A", "lora_B"))
    w.lora["transformer.h.0.attn.c_attn"] = (a.T.contiguous(), b)  # transposed A
    _refused(model, w, AdapterMismatchError, KEY)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values(bad):
    model, w = _weights()
    w.lora["transformer.h.0.attn.c_attn"][1][3, 1] = bad
    _refused(model, w, AdapterMismatchError, KEY.replace("lora_A", "lora_B"))


def test_non_float_dtype():
    model, w = _weights()
    a, b = w.lora["transformer.h.0.attn.c_attn"]
    w.lora["transformer.h.0.attn.c_attn"] = (a.to(torch.int64), b)
    _refused(model, w, AdapterFormatError, KEY)


def test_rank_above_maximum_is_refused_and_changes_nothing():
    model, w = _weights()
    _refused(model, w, AdapterTooLargeError, KEY, max_rank=2)
    modules = [(n, id(m)) for n, m in model.named_modules()]
    lm = LoraModel(model, max_rank=2)
    with pytest.raises(AdapterTooLargeError, match="exceeds the maximum 2"):
        lm.add_adapter("big", w)
    assert lm.configs == {} and [(n, id(m)) for n, m in model.named_modules()] == modules
    validate_adapter(model, w, max_rank=4)


def test_rank_disagreeing_with_config():
    model, w = _weights()
    w.config.r = 8  # the tensors are rank 4, so the file's alpha / r would be wrong
    _refused(model, w, AdapterMismatchError, KEY)


def test_modules_to_save_must_fit():
    model = make_bert_cls()
    w = random_weights(model, 1, r=2, lora_alpha=4, target_modules=["query"], modules_to_save=["classifier"])
    w.modules_to_save = {"classifier.weight": torch.randn(5, 32)}
    _refused(model, w, AdapterMismatchError, "base_model.model.classifier.weight")
    w.modules_to_save = {"classifier.weight": torch.full((3, 32), float("nan"))}
    _refused(model, w, AdapterMismatchError, "base_model.model.classifier.weight")
    w.modules_to_save = {"classifier.weight": torch.randn(3, 32)}
    assert validate_adapter(model, w).modules_to_save.keys() == {"classifier.weight"}


def test_head_on_a_bare_encoder_is_refused_unless_detached_is_allowed(tmp_path):
    peft_adapter(make_bert_cls(), tmp_path, task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=["query"])
    weights = load_peft_dir(tmp_path)
    bare = make_bert()
    with pytest.raises(AdapterMismatchError, match="which the base model lacks") as err:
        validate_adapter(bare, weights)
    assert err.value.key in ("base_model.model.classifier.weight", "base_model.model.classifier.bias")
    checked = validate_adapter(bare, weights, allow_detached=True)
    assert set(checked.modules_to_save) == {"classifier.weight", "classifier.bias"}
    assert all(p.startswith("encoder.") for p in checked.lora)  # "bert.encoder..." mapped onto the bare model


def test_task_model_adapter_on_bare_encoder_keeps_per_module_rank_and_alpha(tmp_path):
    """Patterns written against `bert.encoder…` paths must give the same scaling on `encoder…` paths."""
    ids = tokens()
    pm = peft_adapter(make_bert_cls(), tmp_path, task_type="SEQ_CLS", r=4, lora_alpha=8,
                      target_modules=["query", "value"],
                      rank_pattern={"bert.encoder.layer.0.attention.self.query": 2},
                      alpha_pattern={"bert.encoder.layer.1.attention.self.value": 1.0})
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = pm.base_model.model.bert(input_ids=ids).last_hidden_state
    bare = make_bert()
    bare.load_state_dict(make_bert_cls().bert.state_dict())
    lm = LoraModel(bare)
    lm.add_adapter("a", load_peft_dir(tmp_path), allow_detached=True)
    lm.set_adapter("a")
    torch.testing.assert_close(output(bare, ids), want, atol=1e-5, rtol=0)
    assert set(lm.detached["a"]) == {"classifier.weight", "classifier.bias"}


# --------------------------------------------------------------------- paths, ties, dtypes, conflicts
def test_a_head_saved_on_a_tied_lm_head_loads():
    """GPT-2's lm_head.weight is the embeddings' weight: named_parameters() lists it only once."""
    model = make_gpt2()
    vocab, hidden = model.lm_head.weight.shape
    w = random_weights(model, 1, r=2, target_modules=["c_attn"], modules_to_save=["lm_head"])
    w.modules_to_save = {"lm_head.weight": torch.randn(vocab, hidden)}
    lm = LoraModel(model)
    lm.add_adapter("x", w)
    assert "x" not in lm.detached  # applied to the lm_head, not set aside as a detached head
    ids = tokens()
    lm.set_adapter("x")
    logits = output(model, ids)
    hidden_states = model.transformer(input_ids=ids).last_hidden_state
    torch.testing.assert_close(logits, hidden_states @ w.modules_to_save["lm_head.weight"].T, atol=1e-5, rtol=1e-5)


def test_paths_inside_our_wrappers_are_not_modules_of_the_base():
    model = make_bert()
    lm = LoraModel(model)
    lm.add_adapter("one", random_weights(model, 1, r=2, target_modules=["query"]))
    inner = random_weights(model, 2, r=2, target_modules=["query"])
    inner.lora = {f"{p}.base_layer": t for p, t in inner.lora.items()}
    with pytest.raises(AdapterMismatchError, match="has no module"):
        lm.add_adapter("two", inner)


def test_two_keys_naming_one_module_are_refused():
    """`bert.encoder…` (saved from a task model) and `encoder…` resolve to the same layer of a bare encoder."""
    model = make_bert()
    w = random_weights(model, 1, r=2, target_modules=["query"])
    path, pair = next(iter(w.lora.items()))
    w.lora[f"bert.{path}"] = pair
    with pytest.raises(AdapterMismatchError, match="names the same module"):
        validate_adapter(model, w)


def test_values_that_overflow_the_served_dtype_are_refused():
    model = make_bert(dtype=torch.float16)
    w = random_weights(model, 1, r=2, target_modules=["query"])
    path = next(iter(w.lora))
    a, b = w.lora[path]
    w.lora[path] = (a, b * 0 + 7e4)  # finite in float32, inf in float16
    with pytest.raises(AdapterMismatchError, match="overflow the base model's torch.float16"):
        validate_adapter(model, w)


def test_lora_and_modules_to_save_on_one_module_are_refused():
    model = make_bert_cls()
    both = random_weights(model, 1, r=2, target_modules=["classifier"], modules_to_save=["classifier"])
    both.modules_to_save = {"classifier.weight": torch.randn(3, 32), "classifier.bias": torch.zeros(3)}
    with pytest.raises(AdapterMismatchError, match="one or the other"):
        validate_adapter(model, both)
    # across two resident adapters, in either order
    lora_on_head = random_weights(model, 2, r=2, target_modules=["classifier"])
    head = random_weights(model, 3, r=2, target_modules=["query"], modules_to_save=["classifier"])
    head.modules_to_save = dict(both.modules_to_save)
    lm = LoraModel(model)
    lm.add_adapter("lora", lora_on_head)
    with pytest.raises(AdapterMismatchError, match="one or the other"):
        lm.add_adapter("head", head)
    lm.remove_adapter("lora")
    lm.add_adapter("head", head)
    with pytest.raises(AdapterMismatchError, match="replaced whole"):
        lm.add_adapter("lora", lora_on_head)


def test_route_with_the_wrong_number_of_rows_is_a_clear_error():
    model = make_bert()
    lm = LoraModel(model)
    lm.add_adapter("a", random_weights(model, 1, r=2, target_modules=["query"]))
    with pytest.raises(AdapterMismatchError, match="route\\(\\) named 2 rows"), lm.route(["a", None]):
        output(model, tokens(batch=3))
