"""The server's torch thread count: torch's own unless --torch-threads says otherwise."""

from __future__ import annotations

import pytest
import torch

from service.base_model import set_torch_threads


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_an_explicit_count_is_set():
    assert set_torch_threads(3) == 3 and torch.get_num_threads() == 3


def test_by_default_torch_keeps_its_own():
    torch.set_num_threads(5)
    assert set_torch_threads(None) == 5
