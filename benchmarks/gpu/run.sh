#!/usr/bin/env bash
# The GPU check in one command: the CUDA tests, then the benchmarks, then OUTDIR/report.md and OUTDIR/report.json.
#
#   bash benchmarks/gpu/run.sh OUTDIR [--device cuda|cpu] [--wheels DIR] [--budget-s SECONDS]
#
# Run from anywhere; it works in the repository root with PYTHONPATH (the project is not installed). Made for a bare
# GPU machine without network (Python 3.12, torch with CUDA, transformers, peft, ...): the service's other
# dependencies come as wheels made here by fetch-wheels.sh (--wheels DIR, or WHEELS=DIR) and are installed into
# /tmp/site. --device cpu rehearses the same steps with tiny models (what CI runs). The whole run keeps within
# --budget-s (480 s by default): the tests get at most 150 s, the benchmarks what is left less a margin, and each
# step is guarded so that a failure is reported and the next step still runs. Exit status 0 when the report was
# written, whatever it says (read its Summary line); 2 for bad arguments.
set -uo pipefail

usage() { echo "usage: run.sh OUTDIR [--device cuda|cpu] [--wheels DIR] [--budget-s SECONDS]" >&2; exit 2; }
[ $# -ge 1 ] || usage
OUT=$1; shift
DEVICE=cuda
WHEELS=${WHEELS:-}
BUDGET=480
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE=${2:?}; shift 2 ;;
        --wheels) WHEELS=${2:?}; shift 2 ;;
        --budget-s) BUDGET=${2:?}; shift 2 ;;
        *) usage ;;
    esac
done
case "$DEVICE" in cpu|cuda|cuda:*) ;; *) usage ;; esac

REPO=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PYTHON:-python3}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
if [ -n "$WHEELS" ]; then  # relative to where the script was started, before the cd below
    WHEELS=$(cd "$WHEELS" && pwd) || { echo "run.sh: no wheel folder $WHEELS" >&2; exit 2; }
fi
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
log() { echo "[run.sh $(elapsed)s] $*"; }
cd "$REPO"

# 1. Dependencies: the wheels, if given, into /tmp/site (no index, no dependency resolution: the list is complete).
WHEELS_RC=-
if [ -n "$WHEELS" ]; then
    SITE=${SITE:-/tmp/site}
    log "installing $(ls "$WHEELS"/*.whl 2>/dev/null | wc -l) wheels from $WHEELS into $SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --root-user-action=ignore \
        --upgrade --target "$SITE" \
        "$WHEELS"/*.whl
    WHEELS_RC=$?
    export PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ "$DEVICE" = cpu ]; then
    # The rehearsal: shadow the packaged MiniLM, which the GPU machine lacks, and keep to one thread per process
    # (CI's cores are shared; torch's spinning OpenMP workers only slow tiny models down there).
    export PYTHONPATH="$REPO/benchmarks/gpu/bare:$PYTHONPATH" OMP_NUM_THREADS=1
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
"$PY" - <<'EOF' > "$OUT/env.txt" 2>&1
import importlib, sys
print("python", sys.version.split()[0])
for name in ("torch", "transformers", "peft", "fastapi", "pydantic", "pytest", "safetensors", "tokenizers"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:  # noqa: BLE001
        print(name, "MISSING:", exc)
import torch
print("cuda available", torch.cuda.is_available(), torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF
cat "$OUT/env.txt"

# 2. The CUDA tests (on the CPU with --device cpu: the same tests, LORA_TEST_DEVICE=cpu).
TEST_LIMIT=150
log "tests/cuda on $DEVICE (at most ${TEST_LIMIT}s)"
LORA_TEST_DEVICE=$DEVICE timeout -k 10 "$TEST_LIMIT" "$PY" -m pytest -q -p no:cacheprovider -rs -W ignore \
    --junitxml "$OUT/cuda-tests.xml" tests/cuda > "$OUT/cuda-tests.log" 2>&1
TESTS_RC=$?
tail -n 15 "$OUT/cuda-tests.log"

# 3. The benchmarks, with what is left of the budget (less 30 s for the report and the margin of the hard stop).
LEFT=$(( BUDGET - $(elapsed) - 30 ))
[ "$LEFT" -gt 20 ] || LEFT=20
SOFT=$(( LEFT * 85 / 100 ))  # sections stop starting here; the hard stop at LEFT cuts one that overruns
log "benchmarks on $DEVICE (sections start until ${SOFT}s, hard stop at ${LEFT}s)"
timeout -k 10 "$LEFT" "$PY" benchmarks/gpu/bench_gpu.py --device "$DEVICE" --out "$OUT" --budget-s "$SOFT" \
    2>&1 | tee "$OUT/bench.log" | grep '^\[bench_gpu\]'
BENCH_RC=${PIPESTATUS[0]}

# 4. The report, from whatever the steps left (report.py needs only the standard library).
cat > "$OUT/run.json" <<EOF
{"device": "$DEVICE", "started": "$(date -u -d @"$START" +%FT%TZ)", "seconds": $(elapsed), "budget_s": $BUDGET,
 "wheels": "${WHEELS}", "wheels_rc": "$WHEELS_RC", "tests_rc": $TESTS_RC, "bench_rc": $BENCH_RC}
EOF
"$PY" benchmarks/gpu/report.py "$OUT" > /dev/null
log "done: $OUT/report.md and $OUT/report.json (tests exit $TESTS_RC, benchmarks exit $BENCH_RC)"
cat "$OUT/report.md"  # also on stdout: the tail of a remote run's output carries the results
[ -f "$OUT/report.md" ] && [ -f "$OUT/report.json" ]
