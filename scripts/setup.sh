#!/usr/bin/env bash
# Creates .venv and installs the project into it (editable). Idempotent.
# torch is installed FIRST, pinned to the local CPU build (torch==2.13.0), so that resolving the project's
# open "torch>=2.3" range finds it satisfied and pip never downloads the multi-GB CUDA build.
# On a GPU host: TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>" bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=${1:-}
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # shellcheck disable=SC2086
  $PIP install -q ${TORCH_SPEC:-torch==2.13.0}
fi
$PIP install -q -e ".${EXTRAS:+[$EXTRAS]}"
