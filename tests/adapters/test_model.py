"""LoraModel: exact merge / unmerge / switch, safe merge, the mixed batch, resident adapters."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from lora_fixtures import make_bert_cls, make_gpt2, output, peft_adapter, random_weights, tokens
from torch import nn

from adapters import LoraConfig, LoraModel, LoraWeights, MergeError, UnknownAdapterError

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters by their original name (wrappers add `.base_layer` / `.original_module`), cloned."""
    return {n.replace(".base_layer", "").replace(".original_module", ""): p.detach().clone()
            for n, p in model.named_parameters() if ".lora_" not in n}


def _assert_equal_params(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    current = _params(model)
    assert current.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(current[name], tensor), name


def _two_adapters(model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> LoraModel:
    lm = LoraModel(model)
    lm.add_adapter("x", random_weights(model, 1, dtype=dtype, r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"]))
    lm.add_adapter("y", random_weights(model, 2, dtype=dtype, r=2, lora_alpha=3, target_modules=["c_attn", "c_proj"]))
    return lm


# ---------------------------------------------------------------------------------------------- exact restore
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_1000_switch_cycles_then_unmerge_restore_base_bit_for_bit(dtype):
    model = make_gpt2(dtype=dtype)
    original = _params(model)
    lm = _two_adapters(model, dtype)
    lm.merge("x")
    merged_x = _params(model)
    key = "transformer.h.0.attn.c_attn.weight"
    assert not torch.equal(merged_x[key], original[key])
    for _ in range(1000):  # one cycle: X -> Y -> X
        lm.merge("y")
        lm.merge("x")
    _assert_equal_params(model, merged_x)  # merged X is the same bits on every visit
    lm.unmerge()
    _assert_equal_params(model, original)
    lm.eject()
    _assert_equal_params(model, original)


def _naive_cycles(weights: list[torch.Tensor], deltas: list[tuple[torch.Tensor, torch.Tensor]], n: int) -> None:
    for _ in range(n):
        for w, (dx, dy) in zip(weights, deltas, strict=True):  # PEFT's way: add on merge, subtract on unmerge
            w += dx
            w -= dx
            w += dy
            w -= dy


def test_naive_subtraction_drifts_in_bf16_so_the_exactness_test_means_something():
    model = make_gpt2(dtype=torch.bfloat16)
    lm = _two_adapters(model, torch.bfloat16)
    layers = lm.lora_layers()
    paths = [p for p, layer in layers.items() if "x" in layer.lora_A and "y" in layer.lora_A]
    weights = [layers[p].base_layer.weight.detach().clone() for p in paths]
    original = [w.clone() for w in weights]
    deltas = [(layers[p].delta_weight("x").detach(), layers[p].delta_weight("y").detach()) for p in paths]
    _naive_cycles(weights, deltas, 1000)
    drift = max(float((w.float() - o.float()).abs().max()) for w, o in zip(weights, original, strict=True))
    assert drift > 1e-3, drift
    assert not all(torch.equal(w, o) for w, o in zip(weights, original, strict=True))


def test_peft_merge_unmerge_drifts_in_bf16(tmp_path):
    """The real PEFT, for comparison: its unmerge subtracts, so the base weights do not come back."""
    from peft import LoraConfig as PeftLoraConfig

    model = make_gpt2(dtype=torch.bfloat16)
    original = _params(model)
    pm = peft_adapter(model, tmp_path, r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"])
    pm.add_adapter("y", PeftLoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], init_lora_weights=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(50):
            for name in ("default", "y"):
                pm.set_adapter(name)
                pm.merge_adapter()
                pm.unmerge_adapter()
    after = {n.removeprefix("base_model.model."): p for n, p in _params(pm).items()}
    drift = max(float((after[n].float() - t.float()).abs().max()) for n, t in original.items())
    assert drift > 1e-3, drift


# ---------------------------------------------------------------------------------------------- merge semantics
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merged_output_matches_unmerged(dtype, ids):
    model = make_gpt2(dtype=dtype)
    lm = _two_adapters(model, dtype)
    lm.set_adapter("x")
    unmerged = output(model, ids).float()
    lm.merge("x")
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(output(model, ids).float(), unmerged, atol=tol, rtol=tol)


def test_merge_twice_is_harmless():
    model = make_gpt2()
    lm = _two_adapters(model)
    lm.merge("x")
    once = _params(model)
    lm.merge("x")
    _assert_equal_params(model, once)
    assert lm.merged_adapter == "x"


def test_non_finite_merge_is_refused_and_weights_stay_untouched():
    model = make_gpt2(dtype=torch.float16)
    original = _params(model)
    lm = _two_adapters(model, torch.float16)
    # Entries of 300 are finite in fp16, but s·B·A reaches ~4·300² = 3.6e5 > 65504: inf once merged.
    lm.add_adapter("huge", random_weights(model, 3, scale=300.0, dtype=torch.float16, r=4, lora_alpha=4,
                                          target_modules=["c_fc"]))
    with pytest.raises(MergeError) as err:
        lm.merge("huge")
    assert "c_fc" in err.value.key
    assert lm.merged_adapter is None
    _assert_equal_params(model, original)

    lm.merge("x")  # a merged adapter stays merged after a refused switch
    merged_x = _params(model)
    with pytest.raises(MergeError):
        lm.merge("huge")
    assert lm.merged_adapter == "x"
    _assert_equal_params(model, merged_x)
    lm.unmerge()
    _assert_equal_params(model, original)


def test_cheap_bound_does_not_refuse_a_finite_merge():
    """Large A and B whose product cancels: the bound cannot clear it, the full check on a scratch copy does."""
    model = make_gpt2(dtype=torch.float16)
    original = _params(model)
    weights = random_weights(model, 4, dtype=torch.float16, r=2, lora_alpha=2, target_modules=["c_attn"])
    for a, b in weights.lora.values():
        a.zero_()
        b.zero_()
        b[:, 0] = 1000.0  # B·A = B[:, 0]·A[0] + B[:, 1]·A[1] = 0, yet ‖B_i‖·‖A_:j‖ = 1e6
        a[1] = 1000.0
    lm = LoraModel(model)
    lm.add_adapter("cancel", weights)
    lm.merge("cancel")
    _assert_equal_params(model, original)  # ΔW = 0 exactly
    assert all(layer.may_overflow("cancel") for layer in lm.lora_layers().values())  # the bound could not clear it
    ordinary = _two_adapters(make_gpt2())
    ordinary.merge("x")
    assert not any(layer.may_overflow("x") for layer in ordinary.lora_layers().values() if "x" in layer.scaling)


def test_remove_merged_adapter_restores_base():
    model = make_gpt2(dtype=torch.bfloat16)
    original = _params(model)
    lm = _two_adapters(model, torch.bfloat16)
    lm.merge("y")
    lm.remove_adapter("y")
    assert lm.merged_adapter is None
    _assert_equal_params(model, original)


def test_adapter_added_while_another_is_merged():
    """A layer wrapped during merged mode snapshots its (still pristine) weight; switching stays exact."""
    model = make_gpt2(dtype=torch.bfloat16)
    original = _params(model)
    lm = LoraModel(model)
    lm.add_adapter("x", random_weights(model, 1, dtype=torch.bfloat16, r=2, lora_alpha=4, target_modules=["c_attn"]))
    lm.merge("x")
    lm.add_adapter("w", random_weights(model, 2, dtype=torch.bfloat16, r=2, lora_alpha=4, target_modules=["c_fc"]))
    for _ in range(10):
        lm.merge("w")
        lm.merge("x")
    lm.unmerge()
    _assert_equal_params(model, original)


def test_pristine_copy_memory_is_one_copy_of_the_targeted_weights():
    model = make_gpt2()
    lm = _two_adapters(model)
    assert lm.pristine_nbytes() == 0  # nothing is copied until the first merge
    lm.merge("x")
    targeted = sum(w.numel() * w.element_size() for w in lm.merge_target_weights().values())
    assert lm.pristine_nbytes() == targeted
    lm.release_pristine()  # refused while merged: the copy is what makes unmerge exact
    assert lm.pristine_nbytes() == targeted
    lm.unmerge()
    lm.release_pristine()
    assert lm.pristine_nbytes() == 0


def test_pristine_copy_on_another_device_string():
    model = make_gpt2(dtype=torch.bfloat16)
    original = _params(model)
    lm = LoraModel(model, pristine_device="cpu")
    lm.add_adapter("x", random_weights(model, 1, dtype=torch.bfloat16, r=2, lora_alpha=4, target_modules=["c_attn"]))
    lm.merge("x")
    assert all(t.device.type == "cpu" for t in lm.pristine_weights().values())
    lm.unmerge()
    _assert_equal_params(model, original)


def test_unknown_adapter_is_a_clear_error():
    lm = _two_adapters(make_gpt2())
    for call in (lambda: lm.merge("nope"), lambda: lm.set_adapter("nope"), lambda: lm.remove_adapter("nope")):
        with pytest.raises(UnknownAdapterError, match="nope"):
            call()
    with pytest.raises(UnknownAdapterError), lm.route(["x", "nope"]):
        pass
    assert lm.router.row_ids is None
    with pytest.raises(ValueError, match="already resident"):
        lm.add_adapter("x", random_weights(lm.model, 1, r=4, lora_alpha=8, target_modules=["c_attn"]))


# ---------------------------------------------------------------------------------------------- mixed batch
def _mixed_setup():
    model = make_gpt2()
    lm = LoraModel(model)
    # Different ranks, different target sets, rsLoRA and per-module alpha.
    lm.add_adapter("x", random_weights(model, 1, r=2, lora_alpha=4, target_modules=["c_attn"]))
    lm.add_adapter("y", random_weights(model, 2, r=4, lora_alpha=6, target_modules=["c_attn", "c_fc", "mlp.c_proj"]))
    lm.add_adapter("z", random_weights(model, 3, r=3, lora_alpha=5, use_rslora=True, target_modules=["attn.c_proj"],
                                       alpha_pattern={"h.1.attn.c_proj": 1.5}))
    return model, lm


def _per_row_reference(model, lm, names, ids):
    rows = []
    for i, name in enumerate(names):
        lm.set_adapter(name)
        rows.append(output(model, ids[i:i + 1]))
    lm.set_adapter(None)
    return torch.cat(rows)


NAMES = ["x", None, "y", "z", "x", None, "y"]


def test_mixed_batch_matches_each_row_run_alone():
    model, lm = _mixed_setup()
    ids = tokens(batch=len(NAMES))
    want = _per_row_reference(model, lm, NAMES, ids)
    with lm.route(NAMES):
        got = output(model, ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert not torch.allclose(want[0], want[1], atol=1e-3)  # the adapters really differ per row


@pytest.mark.parametrize("merged", ["x", "y", "z"])
def test_mixed_batch_while_another_adapter_is_merged(merged):
    model, lm = _mixed_setup()
    ids = tokens(batch=len(NAMES))
    want = _per_row_reference(model, lm, NAMES, ids)  # computed unmerged
    lm.merge(merged)
    with lm.route(NAMES):
        got = output(model, ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # Batches where no row uses the merged adapter still subtract it (base rows, other adapters' rows).
    with lm.route([None, None]):
        torch.testing.assert_close(output(model, ids[[1, 5]]), want[[1, 5]], atol=1e-5, rtol=0)
    others = [n for n in ("x", "y", "z") if n != merged]
    with lm.route(others):
        rows = [NAMES.index(n) for n in others]
        torch.testing.assert_close(output(model, ids[rows]), want[rows], atol=1e-5, rtol=0)


@pytest.mark.parametrize("inner", [["y"], [None, "z", "y"], [None]], ids=["one adapter", "routed", "base"])
def test_routing_kept_brings_back_the_routing_of_a_paused_forward(inner):
    """Another forward inside routing_kept(), however it is routed, leaves the outer rows routed as before."""
    model, lm = _mixed_setup()
    ids = tokens(batch=len(NAMES))
    want = _per_row_reference(model, lm, NAMES, ids)
    with lm.route(NAMES):
        with lm.routing_kept():
            with lm.route(inner) if len(inner) > 1 else contextlib.nullcontext(lm.set_adapter(inner[0])):
                output(model, ids[:len(inner)])
        assert lm.router.row_names == NAMES
        torch.testing.assert_close(output(model, ids), want, atol=1e-5, rtol=0)
    lm.set_adapter("x")
    with lm.routing_kept():
        lm.set_adapter("y")
    assert lm.active_adapter == "x" and lm.router.row_ids is None
    torch.testing.assert_close(output(model, ids[:1]), want[:1], atol=1e-5, rtol=0)  # row 0 names "x"


def test_mixed_batch_with_classifier_heads(tmp_path):
    """modules_to_save: each row is classified by its own adapter's head."""
    ids = tokens(batch=5)
    peft_adapter(make_bert_cls(), tmp_path / "a", seed=1, task_type="SEQ_CLS", r=2, lora_alpha=4,
                 target_modules=["query", "value"])
    peft_adapter(make_bert_cls(), tmp_path / "b", seed=2, task_type="SEQ_CLS", r=3, lora_alpha=3,
                 target_modules="all-linear")
    from adapters import load_peft_dir

    model = make_bert_cls()
    lm = LoraModel(model)
    lm.add_adapter("a", load_peft_dir(tmp_path / "a"))
    lm.add_adapter("b", load_peft_dir(tmp_path / "b"))
    names = ["a", "b", None, "b", "a"]
    want = _per_row_reference(model, lm, names, ids)
    with lm.route(names):
        torch.testing.assert_close(output(model, ids), want, atol=1e-5, rtol=0)
    lm.merge("b")
    with lm.route(names):
        torch.testing.assert_close(output(model, ids), want, atol=1e-5, rtol=0)


def test_mixed_batch_sees_weights_updated_by_training(ids):
    """The stacked tables are copies; an optimizer step must not leave them stale."""
    model = make_gpt2()
    lm = LoraModel(model)
    lm.add_trainable_adapter("t", LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"]))
    with lm.route(["t"] * ids.shape[0]):
        output(model, ids)  # builds the tables
    with torch.no_grad():
        for p in lm.trainable_parameters("t"):
            p.add_(0.1)
    lm.set_adapter("t")
    want = output(model, ids)
    with lm.route(["t"] * ids.shape[0]):
        torch.testing.assert_close(output(model, ids), want, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------- resident adapters
def test_get_weights_returns_what_was_added():
    model = make_gpt2()
    weights = random_weights(model, 1, r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"])
    lm = LoraModel(model)
    lm.add_adapter("x", weights)
    back = lm.get_weights("x")
    assert back.lora.keys() == weights.lora.keys()
    for path, (a, b) in weights.lora.items():
        assert torch.equal(back.lora[path][0], a) and torch.equal(back.lora[path][1], b)
    assert back.config is weights.config


def test_trainable_adapter_trains_only_lora(ids):
    model = make_gpt2()
    before = output(model, ids)
    lm = LoraModel(model)
    targets = lm.add_trainable_adapter("t", LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"]))
    assert targets == [f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "mlp.c_fc")]
    torch.testing.assert_close(output(model, ids), before, atol=0, rtol=0)  # B = 0: the identity
    params = lm.trainable_parameters("t")
    assert len(params) == 8 and all(p.requires_grad for p in params)
    for p in model.parameters():
        p.requires_grad_(any(p is q for q in params))
    opt = torch.optim.SGD(params, lr=0.5)
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    model.eval()
    assert not torch.allclose(output(model, ids), before, atol=1e-4)
    frozen = {n: p for n, p in model.named_parameters() if "lora_" not in n}
    assert all(p.grad is None for p in frozen.values())


def test_trainable_head_copies_leave_the_base_head_untouched(ids):
    model = make_bert_cls()
    head = model.classifier
    head_weight = head.weight.detach().clone()
    lm = LoraModel(model)
    lm.add_trainable_adapter("t", LoraConfig(r=2, lora_alpha=4, target_modules=["query"], task_type="SEQ_CLS",
                                             modules_to_save=["classifier"]))
    params = lm.add_trainable_modules("t", ["classifier"])
    assert [tuple(p.shape) for p in params] == [(3, 32), (3,)]
    with torch.no_grad():
        params[0].add_(1.0)
    lm.set_adapter(None)
    base_logits = output(model, ids)
    lm.set_adapter("t")
    assert not torch.allclose(output(model, ids), base_logits, atol=1e-3)
    saved = lm.get_weights("t").modules_to_save
    assert set(saved) == {"classifier.weight", "classifier.bias"}
    torch.testing.assert_close(saved["classifier.weight"], head_weight + 1.0)
    lm.eject()
    assert model.classifier is head and torch.equal(head.weight, head_weight)


def test_adapters_added_under_inference_mode_serve_mixed_batches():
    """A server loads adapters inside torch.inference_mode; their tensors have no version counter."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    lm = LoraModel(base)
    a, b = torch.randn(2, 4), torch.randn(4, 2)
    x = torch.randn(2, 4)
    with torch.inference_mode():
        want_base = base(x)
        lm.add_adapter("x", LoraWeights(LoraConfig(r=2, lora_alpha=4, target_modules=["0"]), {"0": (a, b)}))
        with lm.route(["x", None]):
            out = base(x)
    want_x = base[1](base[0](x[:1]) + 2.0 * x[:1] @ a.T @ b.T)
    torch.testing.assert_close(out[1:], want_base[1:])
    torch.testing.assert_close(out[:1], want_x)


def test_merge_into_a_tied_weight_is_refused_and_changes_nothing():
    """GPT-2's lm_head shares its weight with the input embeddings: a merge would change those too."""
    model = make_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight
    before = _params(model)
    lm = LoraModel(model)
    lm.add_adapter("head", random_weights(model, 1, r=2, lora_alpha=4, target_modules=["lm_head", "c_attn"]))
    lm.add_adapter("attn", random_weights(model, 2, r=2, lora_alpha=4, target_modules=["c_attn"]))
    with pytest.raises(MergeError, match="lm_head.weight is tied"):
        lm.merge("head")
    assert lm.merged_adapter is None
    _assert_equal_params(model, before)
    lm.merge("attn")  # an adapter that leaves the tied layer alone still merges
    with pytest.raises(MergeError, match="tied"):
        lm.merge("head")  # and a refused switch keeps the current merge
    assert lm.merged_adapter == "attn"
    lm.unmerge()
    _assert_equal_params(model, before)


def test_merge_of_an_adapter_added_under_inference_mode():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    lm = LoraModel(base)
    w0 = base[0].weight.detach().clone()
    a, b = torch.randn(2, 4), torch.randn(4, 2)
    with torch.inference_mode():
        lm.add_adapter("x", LoraWeights(LoraConfig(r=2, lora_alpha=4, target_modules=["0"]), {"0": (a, b)}))
        lm.merge("x")
        torch.testing.assert_close(base[0].weight, w0 + 2.0 * b @ a)
        lm.unmerge()
    assert torch.equal(base[0].weight, w0)


def test_adding_a_served_adapter_leaves_the_base_layers_trainability_alone():
    base = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))  # a base the user is still training
    lm = LoraModel(base)
    lm.add_adapter("x", LoraWeights(LoraConfig(r=2, target_modules=["0"]), {"0": (torch.randn(2, 4),
                                                                                    torch.randn(4, 2))}))
    assert base[0].base_layer.weight.requires_grad and base[0].base_layer.bias.requires_grad
    assert not any(p.requires_grad for p in lm.trainable_parameters("x"))


def test_an_add_that_fails_halfway_leaves_no_trace(monkeypatch):
    """E.g. the device runs out of memory at the third layer: the first two must not keep the adapter."""
    from adapters.layer import LoraLinear

    model = make_gpt2()
    before = _params(model)
    modules = dict(model.named_modules())
    lm = LoraModel(model)
    calls = []
    add = LoraLinear.add_adapter

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return add(self, *args, **kwargs)

    monkeypatch.setattr(LoraLinear, "add_adapter", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        lm.add_adapter("x", random_weights(model, 1, r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"]))
    assert "x" not in lm.configs and lm.lora_layers() == {}
    assert dict(model.named_modules()) == modules
    _assert_equal_params(model, before)


def test_route_while_training_keeps_gradients_and_dropout():
    """The stacked gather path is for serving; a routed forward in training goes per adapter instead."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 4))
    lm = LoraModel(base)
    lm.add_trainable_adapter("a", LoraConfig(r=2, lora_alpha=4, target_modules=["0"], lora_dropout=0.5))
    lm.add_trainable_adapter("b", LoraConfig(r=2, lora_alpha=4, target_modules=["0"]))
    with torch.no_grad():
        for p in lm.trainable_parameters("a") + lm.trainable_parameters("b"):
            p.normal_()
    x = torch.randn(3, 4)
    base.eval()
    with lm.route(["a", None, "b"]):
        out = base(x)
    out.sum().backward()
    a_params, b_params = lm.trainable_parameters("a"), lm.trainable_parameters("b")
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in a_params + b_params)
    for name, row in (("a", 0), ("b", 2)):  # each row exactly its own adapter (eval: no dropout)
        lm.set_adapter(name)
        torch.testing.assert_close(out[row], base(x[row:row + 1])[0])
    base.train()
    with lm.route(["a"] * 3):
        noisy = [base(x) for _ in range(2)]
    assert not torch.equal(noisy[0], noisy[1])  # a's dropout is live
