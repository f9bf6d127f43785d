"""The from-scratch tutorials' names (LoRALayer, LinearWithLoRA, replace_linear_with_lora) and the bridge
to PEFT's conventions (alpha/r scaling, A (r, in) and B (out, r))."""

from __future__ import annotations

import copy

import torch
from lora_fixtures import make_bert, output, tokens
from torch import nn

import adapters.tutorial
from adapters import LinearWithLoRA, LoRALayer, LoraModel, replace_linear_with_lora, to_lora_weights


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Sequential(nn.Linear(10, 7), nn.Tanh()), nn.Linear(7, 3))


def _trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_lora_layer_is_alpha_x_a_b_with_tutorial_shapes():
    layer = LoRALayer(6, 4, rank=2, alpha=3.0)
    assert layer.A.shape == (6, 2) and layer.B.shape == (2, 4)  # (in, r), (r, out): transposed w.r.t. PEFT
    x = torch.randn(5, 6)
    assert torch.count_nonzero(layer(x)) == 0  # B = 0 at init
    with torch.no_grad():
        layer.B.normal_()
    torch.testing.assert_close(layer(x), 3.0 * (x @ layer.A @ layer.B))  # scaled by alpha, not alpha / r


def test_replace_linear_with_lora_recurses_and_keeps_outputs_at_init():
    model = _mlp()
    x = torch.randn(4, 6)
    before = model(x)
    for p in model.parameters():
        p.requires_grad_(False)
    assert _trainable(model) == 0
    replace_linear_with_lora(model, rank=2, alpha=4)
    wrapped = [m for m in model.modules() if isinstance(m, LinearWithLoRA)]
    assert len(wrapped) == 3  # including the one nested in the inner Sequential
    assert _trainable(model) == 2 * (6 + 10) + 2 * (10 + 7) + 2 * (7 + 3)
    torch.testing.assert_close(model(x), before, atol=0, rtol=0)


def test_to_lora_weights_gives_identical_outputs_in_lora_model():
    base = make_bert()
    ids = tokens()
    tutorial = replace_linear_with_lora(copy.deepcopy(base), rank=3, alpha=0.5)
    torch.manual_seed(1)
    with torch.no_grad():
        for m in tutorial.modules():
            if isinstance(m, LinearWithLoRA):
                m.lora.B.normal_(0, 0.5)
    # One layer with another rank and alpha: the conversion must keep it (rank/alpha patterns).
    q = tutorial.encoder.layer[1].attention.self.query
    tutorial.encoder.layer[1].attention.self.query = LinearWithLoRA(q.linear, rank=5, alpha=2.0)
    with torch.no_grad():
        tutorial.encoder.layer[1].attention.self.query.lora.B.normal_(0, 0.5)
    want = output(tutorial, ids)
    assert not torch.allclose(want, output(base, ids), atol=1e-3)

    weights = to_lora_weights(tutorial)
    assert weights.config.lora_alpha == 0.5 * 3  # PEFT alpha = tutorial alpha x r
    a, b = weights.lora["encoder.layer.0.attention.self.query"]
    assert a.shape == (3, 32) and b.shape == (32, 3)  # PEFT orientation
    lm = LoraModel(base)
    lm.add_adapter("t", weights)
    lm.set_adapter("t")
    torch.testing.assert_close(output(base, ids), want, atol=1e-5, rtol=1e-5)  # fp32 reassociation only


def test_the_conventions_are_documented():
    doc = adapters.tutorial.__doc__
    assert "alpha / r" in doc and "transposes" in doc
