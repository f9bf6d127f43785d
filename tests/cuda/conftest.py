"""The CUDA tests: skipped without a GPU, or rehearsed on the CPU with LORA_TEST_DEVICE=cpu.

    LORA_TEST_DEVICE unset   cuda when torch sees a GPU, else every test here is skipped (with the reason)
    LORA_TEST_DEVICE=cpu     the same tests, the same code path, on the CPU (how CI rehearses them)
    LORA_TEST_DEVICE=cuda:1  a given GPU

The `cuda` marker is added to every test in this folder, so `-m cuda` selects them and `-m "not cuda"` leaves
them out.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # benchmarks.gpu.models, whatever pytest's import mode
sys.path.insert(0, str(ROOT / "tests" / "service"))  # http_testkit: the tiny GPT-2 and its adapters


def _device() -> tuple[str | None, str]:
    """(device, why not) for this run."""
    override = os.environ.get("LORA_TEST_DEVICE", "").strip()
    if override:
        if override.startswith("cuda") and not torch.cuda.is_available():
            return None, f"LORA_TEST_DEVICE={override}, but torch sees no CUDA device"
        return override, ""
    if torch.cuda.is_available():
        return "cuda", ""
    return None, "no CUDA device (set LORA_TEST_DEVICE=cpu to rehearse these tests on the CPU)"


DEVICE, WHY_NOT = _device()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.cuda)
            if DEVICE is None:
                item.add_marker(pytest.mark.skip(reason=WHY_NOT))


@pytest.fixture(scope="session")
def device() -> str:
    assert DEVICE is not None
    return DEVICE
