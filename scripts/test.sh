#!/usr/bin/env bash
# The test command (README quickstart, and what .ci/run calls): set everything up, lint, run every test.
# The container test (tests/container) needs podman; without a runtime it is reported as skipped, with why.
# With no arguments, the service's HTTP tests then run once more with every app on the shared store (the real
# PostgreSQL + S3 servers the fixtures start): the same behaviour on both stores. Arguments go to pytest, and
# then only that one run happens.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
.venv/bin/ruff check .
if [ "$#" -gt 0 ]; then
  exec .venv/bin/python -m pytest -rs "$@"
fi
.venv/bin/python -m pytest -rs --store-backend shared tests/service/test_*.py
exec .venv/bin/python -m pytest -rs
