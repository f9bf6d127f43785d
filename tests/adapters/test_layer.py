"""LoraLinear: the maths of one wrapped layer (Linear and GPT-2's Conv1D)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from adapters.layer import LoraLinear, Router, is_lora_target_type


def _layer(base: nn.Module) -> LoraLinear:
    return LoraLinear(base, Router(), {})


def _linear(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(6, 5)  # in=6, out=5: a transposition cannot go unnoticed


def _conv1d(seed: int = 0) -> Conv1D:
    torch.manual_seed(seed)
    conv = Conv1D(5, 6)  # nf=out=5, nx=in=6: weight stored (in, out)
    nn.init.normal_(conv.weight)
    nn.init.normal_(conv.bias)
    return conv


def _ab(rank: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rank, 6, generator=g), torch.randn(5, rank, generator=g)  # (r, in), (out, r)


def _active(base: nn.Module, rank: int = 3, scaling: float = 0.75) -> tuple[LoraLinear, torch.Tensor, torch.Tensor]:
    """`base` wrapped, with adapter "a" (A, B from _ab) added and active."""
    layer = _layer(base)
    a, b = _ab(rank)
    layer.add_adapter("a", rank, scaling, A=a, B=b)
    layer.active_adapter = "a"
    return layer, a, b


@pytest.mark.parametrize("make", [_linear, _conv1d], ids=["linear", "conv1d"])
def test_wraps_without_copying_and_keeps_peft_orientation(make):
    base = make()
    layer = _layer(base)
    assert layer.base_layer is base and layer.weight is base.weight and layer.bias is base.bias
    assert (layer.in_features, layer.out_features) == (6, 5)
    assert layer.fan_in_fan_out == isinstance(base, Conv1D)
    a, b = _ab(3)
    layer.add_adapter("a", 3, 0.5, A=a, B=b)
    assert layer.lora_A["a"].weight.shape == (3, 6)  # (r, in)
    assert layer.lora_B["a"].weight.shape == (5, 3)  # (out, r)
    assert layer.base_layer.weight.data_ptr() == base.weight.data_ptr()


@pytest.mark.parametrize("make", [_linear, _conv1d], ids=["linear", "conv1d"])
def test_forward_is_w0x_plus_s_b_a_x(make):
    base = make()
    layer, a, b = _active(base)
    x = torch.randn(2, 4, 6)  # (B, T, in)
    want = base(x) + 0.75 * (x @ a.T @ b.T)  # (B, T, in) @ (in, r) @ (r, out)
    torch.testing.assert_close(layer(x), want)
    layer.active_adapter = None
    torch.testing.assert_close(layer(x), base(x), atol=0, rtol=0)


@pytest.mark.parametrize("make", [_linear, _conv1d], ids=["linear", "conv1d"])
def test_delta_weight_in_base_orientation_and_merge_is_exact_formula(make):
    base = make()
    layer = _layer(base)
    a, b = _ab(2)
    layer.add_adapter("a", 2, 2.0, A=a, B=b)
    delta = 2.0 * b @ a  # (out, r) @ (r, in)
    expected = delta.T if layer.fan_in_fan_out else delta
    torch.testing.assert_close(layer.delta_weight("a"), expected)
    w0 = base.weight.detach().clone()
    layer.snapshot_pristine()
    layer.merge("a")
    torch.testing.assert_close(base.weight.detach(), w0 + expected)
    layer.unmerge()
    assert torch.equal(base.weight, w0)


def test_training_init_is_kaiming_uniform_a_and_zero_b():
    torch.manual_seed(0)
    base = nn.Linear(256, 64)
    layer = _layer(base)
    layer.add_adapter("t", 8, 2.0)
    a, b = layer.lora_A["t"].weight.detach(), layer.lora_B["t"].weight.detach()
    bound = 1 / math.sqrt(256)  # kaiming_uniform(a=√5): gain √(2/6), bound = gain·√(3/fan_in) = 1/√fan_in
    assert float(a.abs().max()) <= bound and float(a.abs().max()) > 0.9 * bound
    assert abs(float(a.std()) - bound / math.sqrt(3)) < 0.1 * bound  # std of U(-b, b) is b/√3
    assert torch.count_nonzero(b) == 0
    layer.active_adapter = "t"
    x = torch.randn(3, 256)
    torch.testing.assert_close(layer(x), base(x), atol=0, rtol=0)  # B = 0: the output is unchanged


def test_dropout_applies_to_the_lora_branch_input_only():
    base = _linear()
    layer = _layer(base)
    a, b = _ab(3)
    layer.add_adapter("a", 3, 0.5, 0.4, A=a, B=b)
    layer.active_adapter = "a"
    x = torch.randn(4, 6)
    layer.train()
    torch.manual_seed(7)
    got = layer(x)
    torch.manual_seed(7)
    dropped = nn.functional.dropout(x, 0.4, training=True)
    torch.testing.assert_close(got, base(x) + 0.5 * dropped @ a.T @ b.T)  # W0 x sees the undropped x
    assert not torch.allclose(got, base(x) + 0.5 * x @ a.T @ b.T)
    layer.eval()
    torch.testing.assert_close(layer(x), base(x) + 0.5 * x @ a.T @ b.T)


def test_several_adapters_resident_at_once():
    base = _linear()
    layer = _layer(base)
    for i, (rank, scale) in enumerate([(1, 1.0), (2, 0.5), (4, 3.0)]):
        a, b = _ab(rank, seed=i)
        layer.add_adapter(f"a{i}", rank, scale, A=a, B=b)
    x = torch.randn(3, 6)
    for i, (rank, scale) in enumerate([(1, 1.0), (2, 0.5), (4, 3.0)]):
        a, b = _ab(rank, seed=i)
        layer.active_adapter = f"a{i}"
        torch.testing.assert_close(layer(x), base(x) + scale * x @ a.T @ b.T)
    layer.remove_adapter("a1")
    assert layer.adapter_names() == ["a0", "a2"]


def test_while_merged_another_adapter_is_served_exactly():
    """W holds W0 + ΔM; adapter X is served as W x + ΔX x − ΔM x, the base as W x − ΔM x."""
    base = _linear()
    layer = _layer(base)
    for name, seed in (("m", 1), ("x", 2)):
        a, b = _ab(2, seed)
        layer.add_adapter(name, 2, 0.5, A=a, B=b)
    x = torch.randn(3, 6)
    layer.active_adapter = "x"
    want_x = layer(x)
    layer.active_adapter = None
    want_base = layer(x)
    layer.snapshot_pristine()
    layer.merge("m")
    layer.active_adapter = "x"
    torch.testing.assert_close(layer(x), want_x)
    layer.active_adapter = None
    torch.testing.assert_close(layer(x), want_base)


def test_target_types():
    assert is_lora_target_type(nn.Linear(2, 2)) and is_lora_target_type(Conv1D(2, 2))
    assert not is_lora_target_type(nn.Embedding(3, 2)) and not is_lora_target_type(nn.LayerNorm(2))


@pytest.mark.parametrize("make", [_linear, _conv1d, lambda: nn.Linear(6, 5, bias=False)],
                         ids=["linear", "conv1d", "linear-no-bias"])
def test_fused_single_adapter_path_equals_base_plus_branch_with_gradients(make):
    """The single-adapter path computes the base GEMM itself, onto the LoRA term (see _fused_forward)."""
    base = make()
    layer, a, b = _active(base)
    assert layer._fusable(torch.zeros(1, 6), "a")
    x = torch.randn(2, 4, 6, requires_grad=True)
    got = layer(x)
    want = base(x) + 0.75 * (x @ a.T @ b.T)
    torch.testing.assert_close(got, want)
    got.sum().backward()
    grad_a = layer.lora_A["a"].weight.grad.clone()
    layer.lora_A["a"].weight.grad = None
    x.grad = None
    (base(x) + 0.75 * layer.lora_B["a"](layer.lora_A["a"](x))).sum().backward()
    torch.testing.assert_close(grad_a, layer.lora_A["a"].weight.grad)
    assert layer(torch.randn(6)).shape == (5,)  # an unbatched input keeps its shape


def test_layers_the_fused_path_must_not_compute_itself_fall_back():
    class Scaled(nn.Linear):  # e.g. a quantized Linear: its own forward, not W x + b
        def forward(self, x):
            return 2 * super().forward(x)

    torch.manual_seed(0)
    base, x = Scaled(6, 5), torch.randn(3, 6)
    layer, a, b = _active(base, rank=2, scaling=1.0)
    assert not layer._fusable(x, "a")
    torch.testing.assert_close(layer(x), base(x) + x @ a.T @ b.T)
    hooked = nn.Linear(6, 5)
    seen = []
    hooked.register_forward_hook(lambda *_: seen.append(1))
    layer, _, _ = _active(hooked, rank=2, scaling=1.0)
    layer(torch.randn(3, 6))
    assert seen == [1]  # the base layer's hooks still run


def test_a_hook_that_keeps_the_base_output_sees_the_base_output():
    """The LoRA term is added into the base output in place only when no hook can hold on to that tensor."""
    torch.manual_seed(0)
    base, x = nn.Linear(6, 5), torch.randn(3, 6)
    kept = []
    base.register_forward_hook(lambda _m, _i, out: kept.append(out))
    router = Router()
    layer = LoraLinear(base, router, {"a": 1})
    a, b = _ab(2)
    layer.add_adapter("a", 2, 0.5, A=a, B=b)
    layer.active_adapter = "a"
    with torch.no_grad():
        plain = nn.functional.linear(x, base.weight, base.bias)
        single = layer(x)
        router.row_ids = torch.tensor([1, 0, 1])  # the mixed path: rows 0 and 2 use "a", row 1 the base
        mixed = layer(x)
    torch.testing.assert_close(single, plain + 0.5 * x @ a.T @ b.T)
    torch.testing.assert_close(mixed, plain + 0.5 * (x @ a.T @ b.T) * torch.tensor([[1.0], [0.0], [1.0]]))
    assert len(kept) == 2
    for out in kept:
        assert torch.equal(out, plain)
