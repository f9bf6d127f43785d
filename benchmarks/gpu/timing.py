"""Timing and bookkeeping for bench_gpu.py: interleaved samples timed with CUDA events, a global deadline, and the
figures (value, target, pass) that report.py turns into report.md and report.json.

On CUDA each sample is bracketed by two events on the current stream and the device is synchronised after it, so
the figure is device time of exactly that call (launch overhead included, as a caller pays it). On the CPU (the
rehearsal) it is wall time. Contenders run round-robin so that clock changes hit all of them alike; the figure is
the median.
"""

from __future__ import annotations

import json
import os
import statistics
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["Deadline", "Recorder", "time_interleaved", "median_ms"]


class Deadline:
    """The whole run's time budget: sections ask before starting, timing loops before every round."""

    def __init__(self, budget_s: float) -> None:
        self.end = time.monotonic() + budget_s

    def left(self) -> float:
        return self.end - time.monotonic()

    def passed(self) -> bool:
        return self.left() <= 0


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_interleaved(fns: dict[str, Callable[[], object]], runs: dict[str, int] | int, device: str,
                     deadline: Deadline, warmup: int = 2) -> dict[str, list[float]]:
    """Milliseconds per call of each fn, round-robin; a contender with fewer runs takes part in the first rounds
    only. Stops early (keeping at least one round) when the deadline passes."""
    counts = runs if isinstance(runs, dict) else dict.fromkeys(fns, runs)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    cuda = device.startswith("cuda")
    for i in range(max(counts.values())):
        if i > 0 and deadline.passed():
            break
        for name, fn in fns.items():
            if i >= counts[name]:
                continue
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                samples[name].append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                samples[name].append(1e3 * (time.perf_counter() - t0))
    return samples


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples)


class Recorder:
    """Figures and section outcomes, written to OUT/bench.json after every section, so that a run cut short
    (time limit, crash) still reports what it measured."""

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        self.path = path
        self.data: dict[str, Any] = {"meta": meta, "sections": [], "figures": []}
        self.flush()

    def figure(self, section: str, name: str, value: float | None, unit: str, target: str = "",
               passed: bool | None = None, **detail: Any) -> None:
        """`target` in words (e.g. "<= 1.5"); `passed` None for a figure without a target (a reference)."""
        self.data["figures"].append({"section": section, "name": name, "value": value, "unit": unit,
                                     "target": target, "pass": passed, "detail": detail})

    def run(self, section: str, fn: Callable[[], object], deadline: Deadline, min_left_s: float = 0.0) -> None:
        """Run one section guarded: an exception is recorded with its traceback and the next section still runs."""
        t0 = time.monotonic()
        entry: dict[str, Any] = {"section": section}
        if deadline.left() < min_left_s:
            entry.update(status="skipped", reason=f"time budget: {deadline.left():.0f} s left, needs {min_left_s:.0f}")
        else:
            try:
                note = fn()
                entry.update(status="ok", note=note)
            except Exception as exc:  # noqa: BLE001 - one section's failure is a result, not the end of the run
                entry.update(status="error", error=f"{type(exc).__name__}: {exc}",
                             traceback=traceback.format_exc(limit=8))
        entry["seconds"] = round(time.monotonic() - t0, 2)
        self.data["sections"].append(entry)
        print(f"[bench_gpu] {section}: {entry['status']} ({entry['seconds']} s)"
              + (f" {entry.get('error', entry.get('reason', ''))}" if entry["status"] != "ok" else ""), flush=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.flush()

    def flush(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")  # then renamed: a run killed mid-write leaves the previous file whole
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        os.replace(tmp, self.path)
