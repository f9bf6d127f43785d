#!/usr/bin/env bash
# The test command (README quickstart, and what .ci/run calls): set everything up, lint, run every test.
# The container test (tests/container) needs podman; without a runtime it is reported as skipped, with why.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -rs "$@"
