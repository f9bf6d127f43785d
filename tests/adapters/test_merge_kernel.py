"""The fused CPU merge kernel against torch.addmm, the formula both compute, and the paths that fall back."""

from __future__ import annotations

import pytest
import torch

from adapters import LoraModel
from adapters.merge_kernel import (
    MAX_FUSED_RANK,
    fused_kernel_available,
    kernel_name,
    set_stream_min_bytes,
    write_merged,
)
from tests.adapters.lora_fixtures import make_gpt2, random_weights

needs_kernel = pytest.mark.skipif(not fused_kernel_available(), reason="kernel not built (see test_kernel_is_built)")


@pytest.fixture
def kernel_calls(monkeypatch) -> list[int]:
    """The number of jobs in each call that reached the compiled kernel (the real kernel still runs): a result
    that addmm computed instead would pass every value check, so the tests that mean the kernel say so."""
    from adapters import merge_kernel

    calls: list[int] = []
    real = merge_kernel._LIB

    class Counting:
        def lora_fused_merge(self, table, n_jobs, n_threads):
            calls.append(n_jobs)
            real.lora_fused_merge(table, n_jobs, n_threads)

        def __getattr__(self, name):  # the kernel's other entry points, uncounted
            return getattr(real, name)

    monkeypatch.setattr(merge_kernel, "_LIB", Counting())
    return calls


def _job(rows: int, cols: int, rank: int, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(rows, cols, generator=g).to(dtype)
    left = torch.randn(rows, rank, generator=g).to(dtype)
    right = torch.randn(rank, cols, generator=g).to(dtype)
    return torch.full_like(w0, float("nan")), w0, left, right, 0.37


def _reference(w0, left, right, scale):
    return w0.double() + scale * (left.double() @ right.double())


def test_kernel_is_built():
    """The README's set-up builds it (setup.py, with the C compiler every CI machine has): if this fails, merges
    still work through addmm, but a switch costs about half a copy more."""
    assert fused_kernel_available(), "adapters/_fused_merge.c was not compiled: is a C compiler (cc/gcc) installed?"
    assert kernel_name("cpu", torch.float32) == "fused"


@needs_kernel
@pytest.mark.parametrize("rows,cols,rank", [
    (384, 384, 8),     # MiniLM attention: whole 128-column blocks
    (7, 200, 3),       # 128 + 4·16 + 8 columns: every tail path
    (1, 1, 1),         # one element
    (300, 17, 32),     # the largest fused rank; 16 + 1 columns
    (2049, 96, 16),    # more than one thread's worth of rows
])
def test_fused_matches_the_formula(rows, cols, rank, kernel_calls):
    out, w0, left, right, s = _job(rows, cols, rank)
    w0_before = w0.clone()
    write_merged([(out, w0, left, right, s)])
    assert kernel_calls == [1], "the job must reach the kernel"
    torch.testing.assert_close(out.double(), _reference(w0, left, right, s), rtol=1e-5, atol=1e-5)
    assert torch.equal(w0, w0_before), "W0 is only read"
    by_addmm = torch.empty_like(out)
    write_merged([(by_addmm, w0, left, right, s)], fused=False)
    assert kernel_calls == [1], "fused=False must not reach the kernel"
    torch.testing.assert_close(out, by_addmm, rtol=1e-6, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("rows,cols,rank", [(384, 384, 8), (7, 200, 3), (300, 17, 32)])
def test_bfloat16_weights_round_once_like_addmm(rows, cols, rank, kernel_calls):
    """bfloat16 W0 and factors: the sum is made in float32 and rounded once to nearest even, as addmm does;
    at most one unit in the last place apart from addmm, and as close to the exact value."""
    out, w0, left, right, s = _job(rows, cols, rank, dtype=torch.bfloat16)
    write_merged([(out, w0, left, right, s)])
    assert kernel_calls == [1] and out.dtype == torch.bfloat16
    by_addmm = torch.empty_like(out)
    write_merged([(by_addmm, w0, left, right, s)], fused=False)
    exact = _reference(w0, left, right, s)
    ulp = by_addmm.double().abs().clamp_min(1e-3) * 2.0**-7  # bfloat16 keeps 8 significant bits
    assert ((out.double() - by_addmm.double()).abs() <= ulp).all()
    assert (out.double() - exact).abs().max() <= (by_addmm.double() - exact).abs().max() * 1.01 + 1e-6


@needs_kernel
def test_bfloat16_nan_stays_nan_and_overflow_becomes_inf(kernel_calls):
    w0 = torch.zeros(1, 20, dtype=torch.bfloat16)
    w0[0, 0], w0[0, 1], w0[0, 17] = float("nan"), 3.0e38, 3.0e38  # 17: the scalar tail after one 16-wide block
    right = torch.zeros(1, 20, dtype=torch.bfloat16)
    right[0, 1], right[0, 17] = 3.0e38, 3.0e38
    out = torch.empty_like(w0)
    write_merged([(out, w0, torch.ones(1, 1, dtype=torch.bfloat16), right, 1.0)])
    assert kernel_calls == [1]
    assert out[0, 0].isnan() and out[0, 1] == float("inf") and out[0, 17] == float("inf")


@needs_kernel
def test_one_call_for_many_jobs_writes_each_exactly_as_alone(kernel_calls):
    jobs = [_job(r, c, k, seed=i) for i, (r, c, k) in enumerate([(64, 640, 8), (1536, 384, 8), (5, 3, 2)])]
    write_merged(jobs)
    assert kernel_calls == [3]
    for out, w0, left, right, s in jobs:
        alone = torch.empty_like(out)
        write_merged([(alone, w0, left, right, s)])
        assert torch.equal(out, alone), "a job's result must not depend on its neighbours or the thread split"


@needs_kernel
def test_result_does_not_depend_on_the_number_of_threads():
    out, w0, left, right, s = _job(4096, 384, 8)  # 1.5M elements: split across threads
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            write_merged([(out, w0, left, right, s)])
            results.append(out.clone())
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(results[0], r) for r in results[1:])


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,cols,rank,offset", [
    (96, 384, 8, 0),   # every row starts on a cache line: streamed
    (33, 200, 3, 0),   # 128 + 4·16 + 8 columns: rows alternate between aligned and not
    (40, 256, 4, 5),   # no row on a cache line: plain stores even when streaming is on
])
def test_streaming_stores_write_the_same_bits(rows, cols, rank, offset, dtype, kernel_calls):
    """A call larger than the last-level cache streams its stores; forced on for a small job here, the result must
    equal the plain stores' bit for bit (W0, the factors and the order of the sums are the same)."""
    _, w0, left, right, s = _job(rows, cols, rank, dtype=dtype)
    results = []
    for stream_min in (1 << 62, 0):  # never, always
        buffer = torch.full((rows * cols + offset,), float("nan"), dtype=dtype)
        out = buffer[offset:].view(rows, cols)
        before = set_stream_min_bytes(stream_min)
        try:
            write_merged([(out, w0, left, right, s)])
        finally:
            set_stream_min_bytes(before)
        results.append(out)
    assert kernel_calls == [1, 1]
    assert torch.equal(results[0], results[1])
    if dtype == torch.float32:
        torch.testing.assert_close(results[1].double(), _reference(w0, left, right, s), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_transposed_factors_are_made_contiguous_first(kernel_calls):
    """GPT-2's Conv1D passes Aᵀ and Bᵀ: views, not contiguous; the kernel reads them as row-major copies."""
    out, w0, left, right, s = _job(96, 80, 4)
    write_merged([(out, w0, left.T.contiguous().T, right.T.contiguous().T, s)])
    assert kernel_calls == [1]
    torch.testing.assert_close(out.double(), _reference(w0, left, right, s), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["float64", "float16", "rank_too_large", "strided_out"])
def test_what_the_kernel_does_not_take_still_merges_through_addmm(case, monkeypatch):
    dtype = {"float64": torch.float64, "float16": torch.float16}.get(case, torch.float32)
    rank = MAX_FUSED_RANK + 1 if case == "rank_too_large" else 4
    out, w0, left, right, s = _job(48, 40, rank, dtype=dtype)
    if case == "strided_out":
        out = torch.empty(40, 48).T  # (48, 40), not contiguous
    from adapters import merge_kernel

    monkeypatch.setattr(merge_kernel, "_LIB", None if merge_kernel._LIB is None else _Refusing())
    write_merged([(out, w0, left, right, s)])
    tol = 0.05 if dtype == torch.float16 else 1e-5
    torch.testing.assert_close(out.double(), _reference(w0, left, right, s), rtol=tol, atol=tol)


class _Refusing:
    def lora_fused_merge(self, *args):
        raise AssertionError("this job must not reach the kernel")


@needs_kernel
def test_a_fused_write_moves_the_version_counter_like_an_inplace_op(kernel_calls):
    out, w0, left, right, s = _job(32, 64, 4)
    before = out._version
    write_merged([(out, w0, left, right, s)])
    assert kernel_calls == [1] and out._version > before


def test_the_reported_kernel_follows_the_choice_device_and_dtype():
    assert kernel_name("cpu", torch.float32, fused=False) == "addmm"
    assert kernel_name("cpu", torch.float64) == "addmm" and kernel_name("cpu", torch.float16) == "addmm"
    assert kernel_name("cpu", torch.bfloat16) == "fused"
    assert kernel_name("cuda", torch.float32) == "addmm"


@needs_kernel
def test_switches_on_gpt2_agree_with_addmm_and_restore_bit_for_bit(kernel_calls):
    """Conv1D layers (fan_in_fan_out), all-linear: the fused switch gives addmm's weights (to the last bits) and
    unmerging after many switches still gives W0 exactly."""
    weights, calls_by_mode = {}, {}
    for merge_with_kernel in (True, False):
        model = make_gpt2(seed=0)
        original = {n: p.detach().clone() for n, p in model.named_parameters()}
        lm = LoraModel(model, fused_merges=merge_with_kernel)
        for i, name in enumerate(("x", "y")):
            lm.add_adapter(name, random_weights(model, seed=10 + i, r=4, target_modules="all-linear"))
        for step in range(6):
            lm.merge("xy"[step % 2])
        weights[merge_with_kernel] = {p: w.detach().clone() for p, w in lm.merge_target_weights().items()}
        calls_by_mode[merge_with_kernel] = list(kernel_calls)
        kernel_calls.clear()
        lm.unmerge()
        for n, p in lm.model.named_parameters():
            key = n.replace(".base_layer", "")
            if key in original:
                assert torch.equal(p, original[key]), n
    # Six switches with the kernel, each one call for every targeted layer; none with fused_merges=False.
    assert calls_by_mode == {True: [len(weights[True])] * 6, False: []}
    for path, w in weights[True].items():
        torch.testing.assert_close(w, weights[False][path], rtol=1e-6, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_output_overlapping_an_input_is_refused_like_addmm_does(dtype):
    """The kernel reads W0 while it writes: an overlapping pair would come out silently wrong, so it goes to
    addmm instead (with the factors as given, not the kernel's float32 copies), which refuses it."""
    buffer = torch.randn(65, 64).to(dtype)
    out, w0 = buffer[1:], buffer[:-1]  # shifted by one row: they share 63 rows
    left, right = torch.randn(64, 4).to(dtype), torch.randn(4, 64).to(dtype)
    with pytest.raises(RuntimeError, match="memory location"):
        write_merged([(out, w0, left, right, 0.5)])


@needs_kernel
def test_negative_views_are_resolved_before_the_kernel_reads_them():
    out, w0, left, right, s = _job(40, 48, 4)
    write_merged([(out, w0, torch._neg_view(left), right, s)])
    torch.testing.assert_close(out.double(), _reference(w0, -left, right, s), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_an_empty_job_beside_real_ones_is_skipped_by_the_kernel():
    """Called directly (write_merged never sends one): a job with no columns must not divide by zero."""
    import ctypes

    from adapters import merge_kernel

    out, w0, left, right, s = _job(64, 640, 4)
    empty = merge_kernel._Job(0, 0, 0, 0, 3, 0, 4, 1.0)
    real = merge_kernel._Job(out.data_ptr(), w0.data_ptr(), left.data_ptr(), right.data_ptr(), 64, 640, 4, s)
    table = (merge_kernel._Job * 2)(empty, real)
    merge_kernel._LIB.lora_fused_merge(table, 2, ctypes.c_int64(2))
    torch.testing.assert_close(out.double(), _reference(w0, left, right, s), rtol=1e-5, atol=1e-5)
    write_merged([(torch.empty(0, 5), torch.empty(0, 5), torch.empty(0, 2), torch.empty(2, 5), 1.0)])  # addmm: fine
