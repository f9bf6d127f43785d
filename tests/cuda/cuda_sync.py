"""Waiting for the device, for the CUDA tests (a module of its own: `conftest` names several files in this tree)."""

import torch


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
