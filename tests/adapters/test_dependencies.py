"""`adapters` is the core library: torch and safetensors only. Importing it, and every one of its modules,
in a fresh interpreter must not pull in the service, the trainer, or their web and settings libraries."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = ("service", "lora_train", "httpx", "fastapi", "pydantic", "pydantic_settings", "tqdm")

# Imports the allowed dependencies first, then the package and each Python module below it (the C kernel is
# a shared library that merge_kernel.py loads with ctypes, not a module), and prints the modules loaded by each
# step. torch itself imports tqdm where it is installed (torch.hub's progress bar): that one is not ours.
_PROBE = """
import importlib, importlib.util, json, pkgutil, sys
import torch, safetensors.torch
before = sorted(sys.modules)
package = importlib.import_module(sys.argv[1])
modules = [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")
           if importlib.util.find_spec(m.name).origin.endswith(".py")]
for name in modules:
    importlib.import_module(name)
print(json.dumps({"file": package.__file__, "imported": modules, "before": before, "after": sorted(sys.modules)}))
"""


def _forbidden(names: list[str]) -> set[str]:
    return {m for m in names if m.split(".")[0] in FORBIDDEN}


def test_adapters_imports_neither_the_service_nor_the_trainer_nor_their_libraries():
    done = subprocess.run([sys.executable, "-c", _PROBE, "adapters"], cwd=ROOT, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert Path(result["file"]).is_relative_to(ROOT / "adapters")  # this checkout's package, not an installed one
    assert {"adapters.model", "adapters.serialization", "adapters.merge_kernel", "adapters.pack"} <= set(
        result["imported"])
    leaked = _forbidden(result["after"]) - _forbidden(result["before"])
    assert not leaked, sorted(leaked)
    assert not {m for m in _forbidden(result["after"]) if m.split(".")[0] != "tqdm"}  # only torch's tqdm, if any
