"""service/cli.py (`lora-serve`, `python -m service`): refuses bad settings with a reason; one worker."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from service import cli

REPO = Path(__file__).resolve().parents[2]


def test_bad_settings_exit_2_with_the_reason(capsys: pytest.CaptureFixture):
    assert cli.main(["--workers", "4"]) == 2
    err = capsys.readouterr().err
    assert "refusing to start" in err and "--workers" in err and "must be 1" in err
    assert cli.main(["--admin-keys", "tiny"]) == 2
    assert "at least 16" in capsys.readouterr().err


def test_runs_one_uvicorn_worker(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    calls = {}
    monkeypatch.setattr("uvicorn.run", lambda app, **kwargs: calls.update(app=app, **kwargs))
    assert cli.main(["--store", str(tmp_path), "--port", "8123", "--log-level", "warning", "--workers", "1"]) == 0
    assert calls["workers"] == 1 and calls["port"] == 8123 and calls["host"] == "127.0.0.1"
    assert calls["app"].state.settings.store == tmp_path


def test_python_m_service_help():
    proc = subprocess.run([sys.executable, "-m", "service", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "lora-serve" in proc.stdout and "--base-model" in proc.stdout
