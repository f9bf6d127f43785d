"""service/engine/pooling.py: every pooling mode equals sentence-transformers' Pooling module, on rows padded on
the right or on the left, with and without the prompt excluded."""

from __future__ import annotations

import pytest
import torch

from service.embedding_spec import POOLING_MODES, EmbeddingSpec
from service.engine.pooling import embed_vectors, pool

Pooling = pytest.importorskip("sentence_transformers.sentence_transformer.modules").Pooling


def _batch(side: str) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 7, 8, generator=g)  # (B, T, H)
    lengths = [7, 4, 2]
    mask = torch.zeros(3, 7, dtype=torch.long)
    for i, n in enumerate(lengths):
        if side == "right":
            mask[i, :n] = 1
        else:
            mask[i, 7 - n:] = 1
    return hidden, mask


def _reference(hidden, mask, modes, prompt_length=0) -> torch.Tensor:
    module = Pooling(8, pooling_mode=modes if len(modes) > 1 else modes[0], include_prompt=prompt_length == 0)
    features = {"token_embeddings": hidden, "attention_mask": mask}
    if prompt_length:
        features["prompt_length"] = prompt_length
    return module(features)["sentence_embedding"]


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("mode", POOLING_MODES)
def test_each_mode_matches_sentence_transformers(mode: str, side: str):
    hidden, mask = _batch(side)
    torch.testing.assert_close(pool(hidden, mask, (mode,)), _reference(hidden, mask, (mode,)), rtol=0, atol=1e-6)


@pytest.mark.parametrize("side", ["right", "left"])
def test_modes_concatenate_in_order_and_skip_the_prompt(side: str):
    hidden, mask = _batch(side)
    modes = ("cls", "mean", "lasttoken", "weightedmean")
    torch.testing.assert_close(pool(hidden, mask, modes), _reference(hidden, mask, modes), rtol=0, atol=1e-6)
    for mode in ("mean", "cls", "max"):  # the first 2 real tokens of every row are left out
        torch.testing.assert_close(pool(hidden, mask, (mode,), prompt_length=2),
                                   _reference(hidden, mask, (mode,), prompt_length=2), rtol=0, atol=1e-6)


def test_last_token_is_the_last_real_token_whatever_the_padding():
    hidden, right = _batch("right")
    _, left = _batch("left")
    shifted = torch.stack([torch.roll(hidden[i], 7 - int(right[i].sum()), 0) for i in range(3)])  # same tokens, left
    torch.testing.assert_close(pool(hidden, right, ("lasttoken",)), pool(shifted, left, ("lasttoken",)))
    torch.testing.assert_close(pool(hidden, right, ("lasttoken",))[1], hidden[1, 3])


def test_normalisation_follows_the_spec():
    hidden, mask = _batch("right")
    plain = embed_vectors(hidden, mask, EmbeddingSpec(max_length=7, dimensions=8, normalize=False))
    unit = embed_vectors(hidden, mask, EmbeddingSpec(max_length=7, dimensions=8))
    torch.testing.assert_close(unit.norm(dim=-1), torch.ones(3))
    assert not torch.allclose(plain.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(embed_vectors(hidden, mask, None), unit)  # no spec: mean + L2, as always
