"""What a run tells its user: the footprint lines, `training_report.json`, and the `--compare` table.

The footprint is the point of the whole exercise (the seed material: ~500k trainable parameters
against DistilBERT's 66M), so it is printed after every run, not buried in the JSON.
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from lora_train.trainer import TrainArgs, TrainResult

__all__ = ["REPORT_NAME", "COMPARE_NAME", "summary_lines", "write_report", "metric_name", "compare_rows",
           "compare_table", "write_compare"]

REPORT_NAME = "training_report.json"
COMPARE_NAME = "compare.json"
_METRIC = {"classify": "eval_accuracy", "embed": "eval_retrieval_accuracy", "generate": "eval_loss"}


def _mb(n: int) -> str:
    return f"{n / 1e6:,.2f} MB"


def summary_lines(result: TrainResult) -> list[str]:
    pct = 100 * result.trainable_parameters / result.total_parameters
    lines = [f"trainable parameters: {result.trainable_parameters:,} of {result.total_parameters:,} total ({pct:.2f}%)"]
    if result.adapter_bytes is not None:
        lines.append(f"adapter: {result.adapter_bytes:,} bytes ({_mb(result.adapter_bytes)}) vs base: "
                     f"{result.base_bytes:,} bytes ({_mb(result.base_bytes)}), "
                     f"{100 * result.adapter_bytes / result.base_bytes:.2f}% of the base")
        lines.append(f"base weights bit-identical after training: {result.base_unchanged}")
    else:
        lines.append(f"checkpoint: {result.checkpoint_bytes:,} bytes ({_mb(result.checkpoint_bytes)}), a full copy "
                     f"of the model (base: {result.base_bytes:,} bytes)")
    final = result.final
    metric = metric_name(result.task)
    if metric in final:
        lines.append(f"final {metric}: {final[metric]:.4f}")
    lines.append(f"wrote {', '.join(result.checkpoint_files)} to {result.out} "
                 f"({result.checkpoint_bytes:,} bytes); trained in {result.train_seconds:.1f}s")
    return lines


def _environment() -> dict[str, Any]:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
            "machine": platform.machine()}


def write_report(args: TrainArgs, result: TrainResult, path: Path | None = None,
                 extra: dict[str, Any] | None = None) -> Path:
    path = path or Path(result.out) / REPORT_NAME
    report = {"args": asdict(args), **result.as_dict(), "environment": _environment(), **(extra or {})}
    path.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
    return path


def metric_name(task: str) -> str:
    return _METRIC[task]


def compare_rows(results: list[TrainResult]) -> list[dict[str, Any]]:
    rows = []
    for r in results:
        rows.append({"mode": r.mode, "trainable_parameters": r.trainable_parameters,
                     "total_parameters": r.total_parameters,
                     "trainable_percent": 100 * r.trainable_parameters / r.total_parameters,
                     metric_name(r.task): r.final.get(metric_name(r.task)),
                     "checkpoint_bytes": r.checkpoint_bytes, "train_seconds": r.train_seconds,
                     "base_unchanged": r.base_unchanged})
    return rows


def compare_table(rows: list[dict[str, Any]], task: str) -> str:
    """A Markdown table, so the output pastes straight into docs/training.md."""
    metric = metric_name(task)
    head = ["mode", "trainable params", "% of total", metric.removeprefix("eval_"), "checkpoint bytes", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in rows:
        value = r[metric]
        shown = "n/a" if value is None else (f"{100 * value:.2f}%" if "accuracy" in metric else f"{value:.4f}")
        lines.append(f"| {r['mode']} | {r['trainable_parameters']:,} | {r['trainable_percent']:.2f}% | {shown} | "
                     f"{r['checkpoint_bytes']:,} ({_mb(r['checkpoint_bytes'])}) | {r['train_seconds']:.0f} |")
    return "\n".join(lines)


def write_compare(path: Path, args: TrainArgs, results: list[TrainResult]) -> Path:
    rows = compare_rows(results)
    payload = {"args": asdict(args), "task": args.task, "metric": metric_name(args.task), "rows": rows,
               "table": compare_table(rows, args.task), "runs": [r.as_dict() for r in results],
               "environment": _environment()}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
