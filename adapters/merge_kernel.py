"""out = W0 + s·L·R for every layer of a merge or a switch: the one merge formula, and the kernel that runs it.

    W0 (rows, cols) ──read once──► + s · L (rows, r) @ R (r, cols) ──► out (rows, cols), written once

A switch rewrites every targeted weight from its pristine copy W0, so its floor is one copy of those weights.
`torch.addmm(W0, L, R, alpha=s, out=W)` makes two passes over W (it copies W0 into W, then runs the rank-r GEMM
over W): about 1.5-1.75 copies on CPU. The fused kernel (adapters/_fused_merge.c, compiled at install time
when a C compiler is present) reads each row of W0 and writes it once, the update added on the way through
registers (streaming stores once a switch outgrows the last-level cache): 1.1-1.6 copies, and all layers of a
switch in one call on torch's own OpenMP threads.

It runs for CPU float32 and bfloat16 tensors of rank up to MAX_FUSED_RANK (bfloat16 widened to float32 in
registers, the sum rounded once to nearest even); everything else (CUDA, float16, larger ranks, no compiled
kernel) takes addmm. Both compute W0 + s·(L·R) with the product accumulated in float32; they may
differ in the last bit, so two results that must agree (the safe-merge check's candidate and the commit) are
both made by write_merged from the same `LoraLinear.merge_job`. A fused result does not depend on how many jobs
share the call or on the number of threads.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
from pathlib import Path

import torch

__all__ = ["MAX_FUSED_RANK", "MergeJob", "fused_kernel_available", "kernel_name", "write_merged"]

# (out, w0, left, right, scale): out = w0 + scale · left @ right; out, w0 (rows, cols), left (rows, r), right (r, cols)
MergeJob = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]

# The kernel does r multiply-adds per element, so past a small rank it is bound by arithmetic, not memory, like
# MKL's GEMM. Measured (CPU fp32, AVX-512, all-linear MiniLM, 2 threads): about 1.1-1.2 copies at rank 8, 1.25-1.7
# at 16 (addmm 1.75 and 1.9-2.2); at 32 the two are even, beyond it addmm's blocked GEMM is as fast or faster.
MAX_FUSED_RANK = 32
_ABI = 3  # lora_fused_merge_abi() of the C file this loader speaks to
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}  # DTYPE_* in the C file


class _Job(ctypes.Structure):
    """merge_job in _fused_merge.c, field for field."""

    _fields_ = [("out", ctypes.c_void_p), ("w0", ctypes.c_void_p), ("left", ctypes.c_void_p),
                ("right", ctypes.c_void_p), ("rows", ctypes.c_int64), ("cols", ctypes.c_int64),
                ("rank", ctypes.c_int64), ("scale", ctypes.c_double), ("dtype", ctypes.c_int64)]


def _load() -> ctypes.CDLL | None:
    """The compiled kernel next to this file, or None (never installed with a compiler, or an older build)."""
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"_fused_merge{suffix}"
        if not path.is_file():
            continue
        try:
            lib = ctypes.CDLL(str(path))  # torch is imported above, so its libgomp.so.1 is the one bound
            if lib.lora_fused_merge_abi() != _ABI:
                return None
            lib.lora_fused_merge.argtypes = [ctypes.POINTER(_Job), ctypes.c_int64, ctypes.c_int64]
            lib.lora_fused_merge.restype = None
            lib.lora_fused_merge_set_stream_min.argtypes = [ctypes.c_int64]
            lib.lora_fused_merge_set_stream_min.restype = ctypes.c_int64
        except (OSError, AttributeError):  # not loadable, or not the library this file speaks to: use addmm
            return None
        return lib
    return None


_LIB = _load()


def set_stream_min_bytes(n_bytes: int) -> int:
    """Calls of the kernel that write more than `n_bytes` in all use streaming stores (-1: the size of the CPU's
    last-level cache, the default); returns the previous setting. The written values are the same either way."""
    assert _LIB is not None, "no compiled kernel"
    return int(_LIB.lora_fused_merge_set_stream_min(n_bytes))


def fused_kernel_available() -> bool:
    return _LIB is not None


def kernel_name(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, fused: bool = True) -> str:
    """What a merge of weights on `device` in `dtype` runs on here (adapters of rank <= MAX_FUSED_RANK):
    "fused" or "addmm". `fused=False` is the caller's choice of addmm (`LoraModel(fused_merges=False)`)."""
    on = fused and _LIB is not None and torch.device(device).type == "cpu" and dtype in _DTYPES
    return "fused" if on else "addmm"


def _fusable(out: torch.Tensor, w0: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> bool:
    # Spelled out rather than looped: a switch asks this for every layer, and each check costs well under a µs.
    dtype = out.dtype
    if not (dtype in _DTYPES and w0.dtype is dtype and left.dtype is dtype and right.dtype is dtype
            and out.is_cpu and w0.is_cpu and left.is_cpu and right.is_cpu
            and out.dim() == 2 and left.dim() == 2 and out.numel() > 0
            and out.is_contiguous() and w0.is_contiguous() and not out.is_neg() and not w0.is_neg()):
        return False
    rows, cols = out.shape
    rank = left.shape[1]
    return (w0.shape == out.shape and left.shape[0] == rows and right.shape == (rank, cols)
            and 0 < rank <= MAX_FUSED_RANK)


def _overlaps(out: torch.Tensor, other: torch.Tensor) -> bool:
    """Whether two contiguous tensors share any byte: the kernel reads as it writes, so an input that overlaps
    the output (addmm refuses those) must not reach it."""
    start, other_start = out.data_ptr(), other.data_ptr()
    return (start < other_start + other.element_size() * other.numel()
            and other_start < start + out.element_size() * out.numel())


def write_merged(jobs: list[MergeJob], *, fused: bool = True) -> None:
    """out = w0 + s·(left @ right) for every job. CPU float32 and bfloat16 jobs go to the fused kernel in one call (the
    threads split all of them by elements); the rest, or all with fused=False, run torch.addmm one by one, each
    bringing its W0 to the output's device only for its own turn (W0 may be kept on the host: one layer's copy
    at a time)."""
    batch: list[tuple[torch.Tensor, ...]] = []  # the jobs for the kernel
    for out, w0, left, right, scale in jobs:
        if fused and _LIB is not None and _fusable(out, w0, left, right):
            # left/right are (r, ·) or (·, r): a row-major float32 copy is a few kB (the kernel reads the factors
            # as float32, so bfloat16 ones are widened once here, not per weight), and `batch` keeps it alive.
            left32 = left.resolve_neg().to(torch.float32).contiguous()
            right32 = right.resolve_neg().to(torch.float32).contiguous()
            if not (_overlaps(out, w0) or _overlaps(out, left32) or _overlaps(out, right32)):
                batch.append((out, w0, left32, right32, scale))
                continue
        w0 = w0 if w0.device == out.device else w0.to(out.device, non_blocking=True)
        torch.addmm(w0, left, right, alpha=scale, out=out)  # (rows, r) @ (r, cols) -> (rows, cols)
    if not batch:
        return
    table = (_Job * len(batch))(*[
        _Job(out.data_ptr(), w0.data_ptr(), left.data_ptr(), right.data_ptr(), out.shape[0], out.shape[1],
             left.shape[1], float(scale), _DTYPES[out.dtype]) for out, w0, left, right, scale in batch])
    _LIB.lora_fused_merge(table, len(batch), torch.get_num_threads())  # ctypes releases the GIL meanwhile
    for out, *_ in batch:
        if not out.is_inference():
            torch.autograd.graph.increment_version(out)  # written behind autograd's back: say so, as in-place ops do
