"""lora-train runs without the service: importing `lora_train` (and `lora_common`, which the service shares
with it), every module of it, in a fresh interpreter must not pull in the service or its web stack."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVICE_ONLY = ("service", "fastapi", "starlette", "uvicorn", "prometheus_client")

# Imports torch first (it loads tqdm itself where tqdm is installed, for torch.hub), then the package and each
# module below it, and prints the modules loaded by each step.
_PROBE = """
import importlib, json, pkgutil, sys
import torch
before = sorted(sys.modules)
package = importlib.import_module(sys.argv[1])
modules = [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
for name in modules:
    if not name.endswith(".__main__"):  # running the CLI is not importing it
        importlib.import_module(name)
print(json.dumps({"file": package.__file__, "imported": modules, "before": before, "after": sorted(sys.modules)}))
"""


@pytest.mark.parametrize(("package", "forbidden"), [
    ("lora_train", SERVICE_ONLY),
    # The shared loader and name rule need neither the service nor the trainer, nor the trainer's libraries.
    ("lora_common", SERVICE_ONLY + ("lora_train", "httpx", "pydantic", "pydantic_settings", "tqdm")),
])
def test_package_imports_no_service(package, forbidden):
    done = subprocess.run([sys.executable, "-c", _PROBE, package], cwd=ROOT, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert Path(result["file"]).is_relative_to(ROOT / package)  # this checkout's package, not an installed one
    assert result["imported"]
    loaded = set(result["after"]) - set(result["before"])
    leaked = sorted(m for m in loaded if m.split(".")[0] in forbidden)
    assert not leaked, leaked
    assert not any(m.split(".")[0] in SERVICE_ONLY for m in result["after"])
