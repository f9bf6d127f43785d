"""The LoRA library on the GPU: PEFT parity in float32 and bfloat16, exact restore after 1,000 bfloat16 switches,
and a mixed batch equal to its rows run one by one. Tiny Llama- and GPT-2-shaped models, random init on the device.

CUDA merges run on torch.addmm (the C kernel is CPU-only); the CPU rehearsal uses `fused_merges=False` so that it
walks the same addmm path.
"""

from __future__ import annotations

import copy

import pytest
import torch
from cuda_sync import sync

import adapters as A
from benchmarks.gpu.models import gpt2, llama, ours_from_peft, peft_with_adapters

ARCHS = {"llama": lambda device, dtype: llama("tiny", device, dtype),
         "gpt2": lambda device, dtype: gpt2("tiny", device, dtype)}
# Relative Frobenius error allowed between two computations of the same logits: float32 differs only in summation
# order; bfloat16 (8 significant bits) rounds every activation, so two orders of the same sums differ by ~1e-2.
REL_TOL = {torch.float32: 1e-4, torch.bfloat16: 4e-2}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.float(), ref.float()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-12))


def tokens(device: str, batch: int = 4, seq: int = 12) -> torch.Tensor:
    return torch.randint(3, 2000, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)


def ours_and_peft(arch: str, device: str, dtype: torch.dtype, n: int = 2):
    base = ARCHS[arch](device, dtype)
    pm = peft_with_adapters(base, n, rank=8)
    model = copy.deepcopy(base)
    lm = A.LoraModel(model, fused_merges=False)
    for i in range(n):
        lm.add_adapter(f"a{i}", ours_from_peft(pm, f"a{i}"))
    return model, lm, pm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
@torch.inference_mode()
def test_peft_parity(device: str, arch: str, dtype: torch.dtype) -> None:
    model, lm, pm = ours_and_peft(arch, device, dtype)
    assert next(model.parameters()).device.type == torch.device(device).type
    ids = tokens(device)
    names = ["a0", "a1", None, "a1"]
    pm.set_adapter("a1")
    peft_one = pm(input_ids=ids).logits
    peft_mixed = pm(input_ids=ids, adapter_names=[n or "__base__" for n in names]).logits
    ref32 = copy.deepcopy(pm).float()  # the same weights in float32: how far each bf16 computation strays
    ref_one = ref32(input_ids=ids).logits
    with pm.disable_adapter():
        base_out = pm(input_ids=ids).logits

    lm.set_adapter("a1")
    ours_one = model(input_ids=ids).logits
    with lm.route(names):
        ours_mixed = model(input_ids=ids).logits
    lm.merge("a1")
    ours_merged = model(input_ids=ids).logits
    with lm.route(names):  # mixed while a1 is merged: the other rows subtract its branch
        ours_mixed_merged = model(input_ids=ids).logits
    lm.unmerge()
    sync(device)

    tol = REL_TOL[dtype]
    assert ours_one.device.type == torch.device(device).type and ours_one.dtype == dtype
    assert rel_err(ours_one, peft_one) < tol
    assert rel_err(ours_mixed, peft_mixed) < tol
    assert rel_err(ours_merged, peft_one) < tol
    assert rel_err(ours_mixed_merged, peft_mixed) < tol
    # The adapter visibly changes the outputs (so the parity above is not base == base).
    assert rel_err(peft_one, base_out) > 10 * tol
    # In bfloat16, ours is as close to the float32 result as PEFT's own bfloat16 forward (within 2x).
    if dtype == torch.bfloat16:
        assert rel_err(ours_one, ref_one) <= 2 * rel_err(peft_one, ref_one) + 1e-3


@torch.inference_mode()
def test_bit_exact_restore_after_1000_bf16_switches(device: str) -> None:
    switches = 1000
    model, lm, _ = ours_and_peft("llama", device, torch.bfloat16)
    w0 = {path: w.detach().clone() for path, w in lm.merge_target_weights().items()}
    lm.merge("a1")
    first_a1 = {path: w.detach().clone() for path, w in lm.merge_target_weights().items()}
    for i in range(switches):
        lm.merge("a0" if i % 2 == 0 else "a1")  # a switch: each one rewrites every targeted weight from W0
    sync(device)
    assert lm.merged_adapter == "a1"
    after = lm.merge_target_weights()
    assert all(torch.equal(after[p], first_a1[p]) for p in w0), f"merge {switches} of a1 differs from the first"
    assert any(not torch.equal(after[p], w0[p]) for p in w0)
    lm.unmerge()
    sync(device)
    restored = lm.merge_target_weights()
    assert all(restored[p].device.type == torch.device(device).type for p in w0)
    bad = [p for p in w0 if not torch.equal(restored[p], w0[p])]
    assert not bad, f"not bit-exact after {switches} switches: {bad[:3]}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@torch.inference_mode()
def test_mixed_batch_equals_rows_run_alone(device: str, dtype: torch.dtype) -> None:
    model, lm, _ = ours_and_peft("llama", device, dtype, n=4)
    ids = tokens(device, batch=6)
    names = ["a0", "a1", None, "a2", "a0", "a3"]
    for merged in (None, "a2"):
        if merged is not None:
            lm.merge(merged)
        with lm.route(names):
            mixed = model(input_ids=ids).logits  # (6, T, V)
        for i, name in enumerate(names):
            with lm.route([name]):
                alone = model(input_ids=ids[i:i + 1]).logits  # (1, T, V)
            assert rel_err(mixed[i:i + 1], alone) < REL_TOL[dtype], (merged, i, name)
        lm.unmerge()
    # Rows with different adapters really differ (the routing is not a no-op).
    with lm.route(["a0", "a1"]):
        two = model(input_ids=ids[:1].expand(2, -1)).logits
    assert rel_err(two[0], two[1]) > 10 * REL_TOL[dtype]
