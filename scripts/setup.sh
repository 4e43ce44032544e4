#!/usr/bin/env bash
# Create .venv and install triaged with the given extras. Idempotent; safe to re-run.
# torch is installed first and pinned to the CPU build on this machine kind, so pip never pulls a CUDA build
# or silently replaces an installed torch (see README "Installation").
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null 2>&1 || python=python3
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    .venv/bin/python -m pip install -q --disable-pip-version-check "torch==${TRIAGED_TORCH_VERSION:-2.13.0}"
fi
spec="."
[ -n "$extras" ] && spec=".[$extras]"
.venv/bin/python -m pip install -q --disable-pip-version-check -e "$spec"
