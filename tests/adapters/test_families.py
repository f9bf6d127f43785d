"""Mixed batches on every architecture family: row i of a routed forward equals PEFT running row i alone with
its own adapter, whatever shape the family's layers see their rows in (batch-first, flattened to (B·T, H) as
OPT's MLP does, or expanded to k·B rows as beam search does), served, merged and trained.

Adapters are PEFT's own (`init_lora_weights=False`: random non-zero A and B), rank 4 on every linear layer.
"""

from __future__ import annotations

import copy

import pytest
import torch
from family_models import DECODERS, Family, build
from lora_fixtures import VOCAB, make_bert, make_bert_cls, output, peft_adapter

from adapters import AdapterMismatchError, LoraModel, load_peft_dir

ATOL = 1e-4  # fp32; the random adapters move the logits by several units
NAMES = ["a", None, "b", "a"]  # rows 0 and 3 share an adapter, row 1 is the base
ENCODERS = {"bert": (make_bert, dict(target_modules="all-linear")),
            "bert-classifier": (make_bert_cls, dict(task_type="SEQ_CLS", target_modules="all-linear"))}
CASES = [pytest.param(f, id=f.name) for f in DECODERS] + [pytest.param(name, id=name) for name in ENCODERS]


def _setup(case: Family | str, tmp_path) -> tuple[torch.nn.Module, LoraModel, dict]:
    """The bare base, our LoraModel over a fresh copy of it holding PEFT-made adapters a and b, and PEFT's
    model per adapter (None: the bare base)."""
    if isinstance(case, Family):
        base, config = build(case, VOCAB, eos=0), dict(target_modules="all-linear")
    else:
        make, config = ENCODERS[case]
        base = make()
    peft = {None: base}
    for seed, name in enumerate(["a", "b"], start=1):
        peft[name] = pm = peft_adapter(copy.deepcopy(base), tmp_path / name, seed=seed, r=4, lora_alpha=8, **config)
        heads = [p for key, p in pm.named_parameters() if "modules_to_save" in key]
        if heads:  # PEFT copies the base's head: make each adapter's own, as training would
            with torch.no_grad():
                for p in heads:
                    p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
            pm.save_pretrained(str(tmp_path / name))
    lm = LoraModel(copy.deepcopy(base))
    for name in ("a", "b"):
        lm.add_adapter(name, load_peft_dir(tmp_path / name))
    return base, lm, peft


def _expected(peft: dict, ids: torch.Tensor, names: list[str | None]) -> torch.Tensor:
    """Row i as PEFT computes it with adapter names[i] alone."""
    return torch.stack([output(peft[n], ids[i:i + 1])[0] for i, n in enumerate(names)])


@pytest.mark.parametrize("case", CASES)
def test_mixed_rows_equal_peft_served_merged_and_beam_expanded(case, tmp_path):
    base, lm, peft = _setup(case, tmp_path)
    ids = torch.randint(1, VOCAB, (len(NAMES), 7), generator=torch.Generator().manual_seed(0))  # (B, T)
    want = _expected(peft, ids, NAMES)
    assert not torch.allclose(want[0], output(base, ids[:1])[0], atol=1e-2), "adapter a must change the outputs"
    assert not torch.allclose(want[0], output(peft["b"], ids[:1])[0], atol=1e-2), "a and b must differ"
    with lm.route(NAMES):
        torch.testing.assert_close(output(lm.model, ids), want, atol=ATOL, rtol=ATOL)
        # Beam search repeats each row contiguously (repeat_interleave): (k·B, T) rows, B names.
        beams = output(lm.model, ids.repeat_interleave(3, 0))
        torch.testing.assert_close(beams, want.repeat_interleave(3, 0), atol=ATOL, rtol=ATOL)
    lm.merge("a")  # base rows subtract a's branch, b's rows swap it for their own
    with lm.route(NAMES):
        torch.testing.assert_close(output(lm.model, ids), want, atol=ATOL, rtol=ATOL)
    lm.unmerge()


@pytest.mark.parametrize("case", CASES)
def test_training_a_mixed_batch_gives_each_adapter_its_own_rows_gradients(case, tmp_path):
    """The grouped (autograd) path: outputs as PEFT's, and adapter a's gradients from the mixed batch equal
    those of a forward over a's rows alone (rows do not interact in these models)."""
    _, lm, peft = _setup(case, tmp_path)
    ids = torch.randint(1, VOCAB, (len(NAMES), 6), generator=torch.Generator().manual_seed(1))  # (B, T)
    params = [p for name in ("a", "b") for p in lm.trainable_parameters(name)]
    for p in params:
        p.requires_grad_(True)
    with torch.enable_grad():
        with lm.route(NAMES):
            got = lm.model(input_ids=ids)
        got = got.logits if hasattr(got, "logits") else got.last_hidden_state
        torch.testing.assert_close(got.detach(), _expected(peft, ids, NAMES), atol=ATOL, rtol=ATOL)
        weights = torch.randn(got.shape, generator=torch.Generator().manual_seed(2))
        # allow_unused: an encoder's pooler is not on the path to last_hidden_state
        mixed = torch.autograd.grad((got * weights).sum(), lm.trainable_parameters("a"), allow_unused=True)
        lm.set_adapter("a")
        rows = [i for i, n in enumerate(NAMES) if n == "a"]
        alone = lm.model(input_ids=ids[rows])
        alone = alone.logits if hasattr(alone, "logits") else alone.last_hidden_state
        solo = torch.autograd.grad((alone * weights[rows]).sum(), lm.trainable_parameters("a"), allow_unused=True)
    assert any(g is not None and float(g.abs().max()) > 0 for g in solo)
    for g_mixed, g_solo in zip(mixed, solo, strict=True):
        assert (g_mixed is None) == (g_solo is None)
        if g_solo is not None:
            torch.testing.assert_close(g_mixed, g_solo, atol=1e-4, rtol=1e-3)


def test_rows_that_cannot_be_told_apart_fail_loudly(tmp_path):
    """A forward whose rows are not a multiple of the routed rows cannot be mapped: an error, never a guess."""
    _, lm, _ = _setup(next(f for f in DECODERS if f.name == "opt"), tmp_path)  # its MLP sees (B·T, H)
    ids = torch.randint(1, VOCAB, (4, 5), generator=torch.Generator().manual_seed(3))
    with lm.route(["a", None, "b"]), pytest.raises(AdapterMismatchError, match="not a multiple of 3"):
        lm.model(input_ids=ids)
