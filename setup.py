"""Only the C merge kernel lives here; everything else about the package is in pyproject.toml.

The extension is optional: without a C compiler (or OpenMP) the install still succeeds and merges fall back to
torch.addmm, which is exact too, only slower (adapters/merge_kernel.py says which one runs)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "adapters._fused_merge",
    sources=["adapters/_fused_merge.c"],
    extra_compile_args=["-O3", "-fopenmp", "-Wno-psabi"],  # psabi: 64-byte vectors between inlined helpers
    extra_link_args=["-fopenmp"],
    optional=True,
)])
