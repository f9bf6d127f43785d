"""The GPU check rehearsed on the CPU: benchmarks/gpu/run.sh --device cpu runs the very script a GPU machine runs
(tests/cuda with LORA_TEST_DEVICE=cpu, every benchmark section on tiny models, the report), so that the one
command that gets a short GPU slot has already run end to end here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu" / "run.sh"
SECTIONS = [f"{kind} {model} r{rank}" for model in ("llama-tiny", "gpt2-tiny") for rank in (8, 16)
            for kind in ("setup", "switch", "mixed forward")] + ["compiled mixed forward llama-tiny r8"]
SECTIONS.insert(3, "generation llama-tiny r8")  # right after the first model, before the budget can run out


def test_run_sh_rehearses_the_gpu_check_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("LORA_TEST_DEVICE", "PYTHONPATH", "WHEELS")}
    env["PYTHON"] = sys.executable
    done = subprocess.run(["bash", str(SCRIPT), str(out), "--device", "cpu", "--budget-s", "240"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    markdown = (out / "report.md").read_text()

    # The CUDA tests ran, on the CPU, and all passed (the rehearsal also shadows the packaged MiniLM, which the GPU
    # machine does not have).
    tests = report["tests"]
    assert tests["available"] and report["run"]["tests_rc"] == 0, (out / "cuda-tests.log").read_text()[-3000:]
    assert tests["counts"]["passed"] >= 9 and tests["counts"]["failed"] == tests["counts"]["error"] == 0
    assert tests["counts"]["skipped"] == 0
    assert "test_service_end_to_end" in markdown and "test_device_cache_bound_in_bytes" in markdown

    # Every section ran, and every measured one left numbers with targets and verdicts.
    sections = {s["section"]: s for s in report["bench"]["sections"]}
    assert list(sections) == SECTIONS
    assert all(s["status"] == "ok" for s in sections.values()), [s for s in sections.values() if s["status"] != "ok"]
    figures = report["bench"]["figures"]
    for section in SECTIONS:
        if section.startswith(("switch", "mixed forward", "generation")):
            mine = [f for f in figures if f["section"] == section]
            assert mine and all(isinstance(f["value"], float) for f in mine), section
            assert any(f["target"] and f["pass"] is not None for f in mine), section
            assert section in markdown
    # The correctness figures hold even on tiny models: exact restore, PEFT parity, every token generated.
    checks = [f for f in figures if f["unit"] == "bool" or "relative error" in f["name"]]
    assert checks and all(f["pass"] for f in checks), checks
    assert "**Summary**" in markdown and report["summary"]["targets"] >= 20


def test_report_is_written_from_whatever_the_steps_left(tmp_path: Path) -> None:
    """A run cut short (no benchmark output, no test XML) still gives report.md and report.json saying so."""
    (tmp_path / "run.json").write_text(json.dumps({"device": "cuda", "tests_rc": 124, "bench_rc": 137}))
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu" / "report.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["bench"] is None and not report["tests"]["available"]
    markdown = (tmp_path / "report.md").read_text()
    assert "no benchmark results (bench_gpu.py exit status 137)" in markdown
    assert "no test results" in markdown and "exit status 124" in markdown
