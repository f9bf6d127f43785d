#!/usr/bin/env bash
# The serve command (README quickstart): set everything up, then start the service. With no arguments it
# serves the embedded pretrained all-MiniLM-L6-v2 on 127.0.0.1:8000, fully offline. Flags pass through.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/lora-serve "$@"
