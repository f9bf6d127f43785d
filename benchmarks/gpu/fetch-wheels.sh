#!/usr/bin/env bash
# Download, here, the wheels the GPU check needs beyond what a bare GPU machine has (torch with CUDA,
# transformers, peft, safetensors, httpx, prometheus-client, uvloop, tqdm, jinja2): the service's HTTP stack and
# pytest, for CPython 3.12 on manylinux x86-64. run.sh installs them there with --no-index (no network there).
#
#   bash benchmarks/gpu/fetch-wheels.sh DIR      # then copy DIR beside the repository to the GPU machine
#
# The versions are pinned to what the project is tested with here (the shared venv); the list is the requirement
# trees of fastapi, pydantic-settings, uvicorn[httptools], python-multipart and pytest, less what that machine has.
# Fails loudly if any download fails or the total exceeds 64 MiB (what travels with the script).
set -euo pipefail

DIR=${1:?usage: fetch-wheels.sh DIR}
PY=${PYTHON:-python3}
# The GPU machine's Python; another (e.g. PY_VERSION=3.11) only to rehearse run.sh --wheels on a CPU machine.
PY_VERSION=${PY_VERSION:-3.12}
ABI=cp${PY_VERSION//./}
LIMIT=$((64 * 1024 * 1024))

PINNED=(
    # the app: fastapi and what it imports
    fastapi==0.165.0 starlette==1.10.0 annotated-doc==0.0.7 opentelemetry-api==1.45.3
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
    typing-extensions==4.16.0 pydantic-settings==2.16.3 python-dotenv==1.2.4 python-multipart==0.0.34
    # the server (run.sh runs the app in-process, but service.cli imports uvicorn)
    uvicorn==0.55.0 h11==0.16.0 httptools==0.9.0 click==8.5.1
    # async and HTTP plumbing (httpx is there, but TestClient needs these at versions that fit starlette)
    anyio==4.16.0 sniffio==1.3.1 idna==3.21 httpcore==1.0.9 certifi==2026.10.19.post1
    # the CUDA tests
    pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 packaging==26.4 pygments==2.21.0
)

mkdir -p "$DIR"
"$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version "$PY_VERSION" --implementation cp --abi "$ABI" --abi abi3 --abi none \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 --platform any \
    -d "$DIR" "${PINNED[@]}"

# The list must be closed: resolving the roots from DIR alone, for that Python, must need nothing else.
"$PY" -m pip install --quiet --disable-pip-version-check --dry-run --ignore-installed --no-index --find-links "$DIR" \
    --only-binary=:all: --python-version "$PY_VERSION" --implementation cp --abi "$ABI" --abi abi3 --abi none \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --platform any --target "$(mktemp -d)" fastapi pydantic-settings uvicorn httptools python-multipart pytest \
    httpcore anyio \
    || { echo "fetch-wheels: FAILED: the wheels in $DIR do not cover their own requirements" >&2; exit 1; }

count=$(find "$DIR" -maxdepth 1 -name '*.whl' | wc -l)
if [ "$count" -lt "${#PINNED[@]}" ]; then
    echo "fetch-wheels: expected ${#PINNED[@]} wheels in $DIR, found $count" >&2
    exit 1
fi
total=$(find "$DIR" -maxdepth 1 -name '*.whl' -printf '%s\n' | awk '{s += $1} END {print s + 0}')
if [ "$total" -gt "$LIMIT" ]; then
    echo "fetch-wheels: FAILED: $count wheels take $total bytes, over the 64 MiB limit ($LIMIT)" >&2
    exit 1
fi
echo "fetch-wheels: $count wheels, $total bytes (limit $LIMIT) in $DIR"
