"""compose(): exactly Σ wᵢ·sᵢ·Bᵢ·Aᵢ, optional SVD truncation with its true error, saveable like any adapter."""

from __future__ import annotations

import math

import pytest
import torch
from lora_fixtures import make_gpt2, output, random_weights, tokens

from adapters import AdapterError, LoraConfig, LoraModel, LoraWeights, compose, load_peft_dir, save_peft_dir


def _delta(weights: LoraWeights, path: str) -> torch.Tensor:
    a, b = weights.lora[path]
    return weights.scaling_for(path) * (b.double() @ a.double())  # (out, r) @ (r, in)


def _items() -> list[tuple[LoraWeights, float]]:
    model = make_gpt2()
    x = random_weights(model, 1, r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], rank_pattern={"c_fc": 2})
    y = random_weights(model, 2, r=3, lora_alpha=5, use_rslora=True, target_modules=["c_attn", "attn.c_proj"])
    z = random_weights(model, 3, r=2, lora_alpha=1, target_modules=["c_attn"], alpha_pattern={"h.1.attn.c_attn": 7.0})
    return [(x, 0.7), (y, -1.3), (z, 2.0)]  # a negative weight, different targets, ranks and scalings


def _expected(items, path: str) -> torch.Tensor:
    return sum((w * _delta(weights, path) for weights, w in items if path in weights.lora),
               torch.zeros(()).double())


def test_composed_delta_is_exactly_the_weighted_sum():
    items = _items()
    result = compose(items)
    assert result.relative_error is None
    paths = {p for weights, _ in items for p in weights.lora}
    assert set(result.weights.lora) == paths
    for path in paths:
        want = _expected(items, path)
        got = _delta(result.weights, path)
        assert float((got - want).abs().max()) <= 1e-6 * float(want.abs().max()), path
        assert result.ranks[path] == sum(weights.rank_of(path) for weights, _ in items if path in weights.lora)


def test_composed_adapter_behaves_as_the_sum_in_a_model():
    items = _items()
    model = make_gpt2()
    lm = LoraModel(model)
    lm.add_adapter("c", compose(items).weights)
    for path, layer in lm.lora_layers().items():
        torch.testing.assert_close(layer.delta_weight("c").double().T, _expected(items, path), atol=1e-6, rtol=1e-6)


def test_stacking_ranks_is_not_averaging_a_and_b():
    """A PEFT-"linear"-style combination (Σ wB)·(Σ wA) is not Σ w·B·A; ours is (checked above)."""
    x, y = _items()[0][0], _items()[2][0]
    path = "transformer.h.0.attn.c_attn"
    (ax, bx), (ay, by) = x.lora[path], y.lora[path]
    r = min(ax.shape[0], ay.shape[0])
    peft_linear = (0.5 * bx[:, :r] + 0.5 * by[:, :r]).double() @ (0.5 * ax[:r] + 0.5 * ay[:r]).double()
    exact = _delta(compose([(x, 0.5), (y, 0.5)]).weights, path)
    assert not torch.allclose(peft_linear, exact, atol=1e-3)


def _dense_svd_error(items, k: int) -> float:
    discarded = total = 0.0
    for path in {p for weights, _ in items for p in weights.lora}:
        s = torch.linalg.svdvals(_expected(items, path))
        discarded += float((s[k:] ** 2).sum())
        total += float((s ** 2).sum())
    return math.sqrt(discarded / total)


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_svd_truncation_reports_the_true_relative_error(rank):
    items = _items()
    result = compose(items, rank=rank)
    want = _dense_svd_error(items, rank)
    assert want > 0 and result.relative_error == pytest.approx(want, rel=1e-4, abs=1e-7)
    err2 = total2 = 0.0
    for path in result.weights.lora:
        exact = _expected(items, path)
        approx = _delta(result.weights, path)
        assert result.weights.rank_of(path) <= rank
        err2 += float(((exact - approx) ** 2).sum())
        total2 += float((exact ** 2).sum())
        # The truncation is the best rank-k approximation: the dense SVD's, to rounding.
        u, s, vh = torch.linalg.svd(exact)
        k = min(rank, s.numel())
        best = (u[:, :k] * s[:k]) @ vh[:k]
        assert float((approx - best).abs().max()) <= 1e-4 * float(s[0])
    assert math.sqrt(err2 / total2) == pytest.approx(want, rel=1e-3, abs=1e-6)  # the reported error is the real one


def test_the_reported_error_does_not_underflow_for_tiny_weights():
    """The error is relative, so scaling every weight by 1e-25 must not change it (squares of singular
    values near 1e-25 underflow float32)."""
    items = _items()
    tiny = [(weights, w * 1e-25) for weights, w in items]
    assert compose(tiny, rank=2).relative_error == pytest.approx(compose(items, rank=2).relative_error, rel=1e-4)


def test_truncation_is_exact_when_rank_covers_the_total():
    items = _items()
    total_rank = max(compose(items).ranks.values())
    result = compose(items, rank=total_rank)
    assert result.relative_error == 0.0
    for path in result.weights.lora:
        want = _expected(items, path)
        assert float((_delta(result.weights, path) - want).abs().max()) <= 1e-6 * float(want.abs().max())


def test_result_saves_and_reloads(tmp_path):
    items = _items()
    result = compose(items, rank=3)
    save_peft_dir(result.weights, tmp_path)
    back = load_peft_dir(tmp_path)
    ids = tokens()
    outs = []
    for weights in (result.weights, back):
        model = make_gpt2()
        lm = LoraModel(model)
        lm.add_adapter("c", weights)
        lm.set_adapter("c")
        outs.append(output(model, ids))
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)


def test_refusals():
    x = _items()[0][0]
    with pytest.raises(AdapterError, match="at least one"):
        compose([])
    with pytest.raises(AdapterError, match="not a finite number"):
        compose([(x, float("nan"))])
    with pytest.raises(AdapterError, match="not a finite number"):
        compose([(x, "0.5")])
    with pytest.raises(AdapterError, match="rank must be a positive integer"):
        compose([(x, 1.0)], rank=0)
    with pytest.raises(AdapterError, match="rank must be a positive integer"):
        compose([(x, 1.0)], rank=1.5)
    other = random_weights(make_gpt2(), 3, r=2, target_modules=["c_attn"])
    path = next(iter(other.lora))
    a, b = other.lora[path]
    other.lora[path] = (torch.zeros(2, a.shape[1] + 1), b)  # made for another base model
    with pytest.raises(AdapterError, match="disagree on the shape") as err:
        compose([(x, 1.0), (other, 1.0)])
    assert err.value.key == path
    x.modules_to_save = {"score.weight": torch.zeros(2, 32)}
    with pytest.raises(AdapterError, match="modules_to_save"):
        compose([(x, 1.0)])


def test_exact_path_patterns_do_not_match_longer_paths():
    """A composed adapter on both `fc` and `blocks.0.fc` keeps each module's own rank."""
    from torch import nn

    from adapters import validate_adapter

    model = nn.Module()
    model.fc = nn.Linear(4, 4)
    model.blocks = nn.ModuleList([nn.Module()])
    model.blocks[0].fc = nn.Linear(4, 4)
    g = torch.Generator().manual_seed(0)
    x = LoraWeights(LoraConfig(r=2, target_modules=["fc"]), {"fc": (torch.randn(2, 4, generator=g),
                                                                    torch.randn(4, 2, generator=g))})
    y = LoraWeights(LoraConfig(r=3, target_modules=["fc"]), {"blocks.0.fc": (torch.randn(3, 4, generator=g),
                                                                            torch.randn(4, 3, generator=g))})
    result = compose([(x, 1.0), (y, 1.0)]).weights
    assert result.config.rank_for("fc") == 2 and result.config.rank_for("blocks.0.fc") == 3
    validate_adapter(model, result)  # would fail with "rank 3 disagrees" if `fc` also matched `blocks.0.fc`
