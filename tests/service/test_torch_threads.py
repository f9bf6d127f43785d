"""The server's torch thread count: one fewer than its CPUs by default on the CPU, as asked otherwise."""

from __future__ import annotations

import os

import pytest
import torch

from service.base_model import set_torch_threads


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_cpu_default_leaves_the_event_loop_a_core():
    torch.set_num_threads(7)
    assert set_torch_threads(None, torch.device("cpu")) == max(1, len(os.sched_getaffinity(0)) - 1)


def test_an_explicit_count_wins_on_any_device():
    assert set_torch_threads(3, torch.device("cpu")) == 3
    assert set_torch_threads(2, torch.device("cuda")) == 2


def test_on_a_gpu_torch_keeps_its_own_default():
    torch.set_num_threads(5)
    assert set_torch_threads(None, torch.device("cuda")) == 5
