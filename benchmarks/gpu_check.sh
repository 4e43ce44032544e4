#!/usr/bin/env bash
# GPU check: on a CUDA machine, make a fresh virtual environment with the `gpu` install (torch 2.14.1 CUDA build +
# torchvision, pyproject's `gpu` extra), then measure inference on the GPU with benchmarks/gpu_check.py: slices/s at
# batch 1/32/128 in fp32 and AMP (bf16 where supported, else fp16), AMP's agreement with fp32, Grad-CAM cost per
# slice, and one 24-slice series end to end through triaged.ml (Triage -> Predictor). Writes the report to OUT.json.
#
#   bash benchmarks/gpu_check.sh OUT.json
#
# Finishes in under 8 minutes: the install gets at most GPU_CHECK_INSTALL_S (default 300 s), the measurements what is
# left of 450 s, and the Python part skips sections that no longer fit. Exit status: 0 measured; 2 usage; 3 no CUDA
# here (OUT.json says why); 4 the install failed or timed out; 5 the measurement failed or timed out.
#
# Environment:
#   GPU_CHECK_PYTHON=/path/to/python  use that interpreter (an existing `gpu` install) instead of a fresh venv
#   GPU_CHECK_VENV=DIR                where the fresh venv goes (default: a new temporary directory; deleted after)
#   GPU_CHECK_PIP_ARGS="..."          extra pip arguments, e.g. "--no-index --find-links /wheels" on a host without
#                                     a package index
#   GPU_CHECK_NVIDIA_SMI=PATH         the nvidia-smi to ask (default: the one on PATH)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -ne 1 ] || [ -z "$1" ]; then
    echo "usage: bash benchmarks/gpu_check.sh OUT.json" >&2
    exit 2
fi
out="$(realpath -m "$1")"
mkdir -p "$(dirname "$out")"
rm -f "$out"
start=$(date +%s)
total_s=450            # measurement deadline; the rest of the 8 minutes is slack for start-up and cleanup
install_s="${GPU_CHECK_INSTALL_S:-300}"

refuse() {  # code, stage, message: print one line and leave the reason in OUT.json
    python3 - "$out" "$2" "$3" <<'EOF'
import json, sys
out, stage, message = sys.argv[1:]
with open(out, "w") as fh:
    json.dump({"ok": False, "stage": stage, "error": message}, fh, indent=1)
    fh.write("\n")
EOF
    echo "gpu_check: $3" >&2
    exit "$1"
}

smi="${GPU_CHECK_NVIDIA_SMI:-$(command -v nvidia-smi || true)}"
if [ -z "$smi" ] || [ ! -x "$smi" ]; then
    refuse 3 cuda "no CUDA here: nvidia-smi not found, so there is no NVIDIA driver; run this on a CUDA machine"
fi
if ! gpus="$("$smi" -L 2>&1)" || ! grep -q '^GPU ' <<<"$gpus"; then
    refuse 3 cuda "no CUDA here: nvidia-smi lists no GPU (${gpus//$'\n'/ })"
fi
echo "gpu_check: $(head -1 <<<"$gpus")"

cleanup=""
if [ -n "${GPU_CHECK_PYTHON:-}" ]; then
    python="$GPU_CHECK_PYTHON"
else
    venv="${GPU_CHECK_VENV:-}"
    if [ -z "$venv" ]; then
        venv="$(mktemp -d)/venv"
        cleanup="$(dirname "$venv")"
    fi
    trap '[ -n "$cleanup" ] && rm -rf "$cleanup"' EXIT
    rm -rf "$venv"
    base="${PYTHON:-python3.11}"
    command -v "$base" >/dev/null 2>&1 || base=python3
    echo "gpu_check: fresh venv $venv, installing .[gpu] (at most ${install_s} s)"
    # shellcheck disable=SC2086  # GPU_CHECK_PIP_ARGS is a list of words on purpose
    if ! timeout "$install_s" bash -c '
        set -e
        "$1" -m venv "$2"
        "$2/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
        "$2/bin/python" -m pip install -q --disable-pip-version-check $3 -e ".[gpu]"
    ' _ "$base" "$venv" "${GPU_CHECK_PIP_ARGS:-}"; then
        refuse 4 install "installing the gpu extra into $venv failed or took over ${install_s} s"
    fi
    python="$venv/bin/python"
fi

if ! torch_says="$("$python" -c 'import sys, torch; print(torch.__version__); sys.exit(not torch.cuda.is_available())' 2>&1)"; then
    refuse 3 cuda "torch ${torch_says##*$'\n'} sees no CUDA device (a CPU build, a driver older than its CUDA, or no torch)"
fi

left=$(( total_s - ($(date +%s) - start) ))
if [ "$left" -lt 60 ]; then
    refuse 5 measure "only ${left} s left after the install; nothing measured"
fi
echo "gpu_check: measuring (at most ${left} s)"
if ! timeout --kill-after=10 "$left" "$python" -m benchmarks.gpu_check --device cuda --json "$out" \
        --budget $(( left - 30 )); then
    # The Python part writes its report section by section: keep what it measured, say it is incomplete.
    [ -s "$out" ] && { echo "gpu_check: failed or ran past ${left} s; partial report in $out (ok: false)" >&2; exit 5; }
    refuse 5 measure "benchmarks/gpu_check.py failed or ran past ${left} s before measuring anything"
fi
echo "gpu_check: report in $out ($(( $(date +%s) - start )) s)"
