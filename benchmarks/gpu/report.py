"""Assemble OUT/report.md and OUT/report.json from what run.sh left in OUT: bench.json (bench_gpu.py), cuda-tests.xml
(pytest's JUnit XML of tests/cuda) and run.json (the script's own facts). Standard library only, so it runs even
when torch or the benchmarks failed to start; a missing input becomes a line saying so, never a crash.

    python benchmarks/gpu/report.py OUT
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any


def _load_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_tests(path: Path) -> dict[str, Any]:
    """Every test case of the JUnit file with its outcome (passed, failed, error, skipped) and message."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as exc:
        return {"available": False, "reason": f"{path.name}: {exc}", "cases": []}
    cases = []
    for case in root.iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                message = (node.get("message") or "").strip().splitlines()[0][:300] if node.get("message") else ""
                break
        cases.append({"name": f"{case.get('classname', '')}::{case.get('name', '')}", "outcome": outcome,
                      "seconds": float(case.get("time") or 0), "message": message})
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
    return {"available": True, "cases": cases, "counts": counts}


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def _verdict(passed: bool | None) -> str:
    return {True: "pass", False: "FAIL", None: ""}[passed]


def render(report: dict[str, Any]) -> str:
    run, bench, tests = report["run"], report["bench"], report["tests"]
    machine = (bench or {}).get("meta", {}).get("machine", {})
    lines = ["# GPU check", "",
             f"device `{run.get('device')}`; {machine.get('gpu') or machine.get('cpu', '?')}; torch "
             f"{machine.get('torch', '?')}; python {machine.get('python', '?')}; started {run.get('started', '?')}; "
             f"{run.get('seconds', '?')} s in all", ""]
    if run.get("device") == "cpu":
        lines += ["CPU rehearsal: tiny models and a few iterations, to prove the script; its figures say nothing about "
                  "the targets, which are set for the GPU.", ""]
    lines += ["## Tests (tests/cuda)", ""]
    if tests["available"]:
        c = tests["counts"]
        lines += [f"{c['passed']} passed, {c['failed']} failed, {c['error']} errors, {c['skipped']} skipped "
                  f"(pytest exit status {run.get('tests_rc')})", "",
                  "| test | outcome | s | message |", "|---|---|---|---|"]
        lines += [f"| `{t['name']}` | {t['outcome']} | {t['seconds']:.1f} | {t['message']} |" for t in tests["cases"]]
    else:
        lines += [f"no test results: {tests['reason']} (pytest exit status {run.get('tests_rc')})"]
    lines += ["", "## Benchmarks (benchmarks/gpu/bench_gpu.py)", ""]
    if bench is None:
        lines += [f"no benchmark results (bench_gpu.py exit status {run.get('bench_rc')})"]
    else:
        lines += ["| section | figure | value | unit | target | result |", "|---|---|---|---|---|---|"]
        lines += [f"| {f['section']} | {f['name']} | {_fmt(f['value'])} | {f['unit']} | {f['target']} | "
                  f"{_verdict(f['pass'])} |" for f in bench["figures"]]
        lines += ["", "| section | status | s | note |", "|---|---|---|---|"]
        for s in bench["sections"]:
            note = s.get("note") or s.get("error") or s.get("reason") or ""
            lines.append(f"| {s['section']} | {s['status']} | {s['seconds']} | {str(note).replace('|', '/')} |")
    s = report["summary"]
    lines += ["", f"**Summary**: {s['targets_passed']} of {s['targets']} targets met; sections with errors: "
              f"{s['section_errors']}; tests failed: {s['tests_failed']}.", ""]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    out = Path(argv[0])
    run = _load_json(out / "run.json") or {}
    bench = _load_json(out / "bench.json")
    tests = read_tests(out / "cuda-tests.xml")
    figures = (bench or {}).get("figures", [])
    targeted = [f for f in figures if f["pass"] is not None]
    summary = {"targets": len(targeted), "targets_passed": sum(bool(f["pass"]) for f in targeted),
               "section_errors": [s["section"] for s in (bench or {}).get("sections", []) if s["status"] == "error"],
               "tests_failed": (tests.get("counts", {}).get("failed", 0) + tests.get("counts", {}).get("error", 0))
               if tests["available"] else None}
    report = {"run": run, "summary": summary, "tests": tests, "bench": bench}
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "report.md").write_text(render(report))
    print(render(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
