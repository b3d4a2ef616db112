#!/usr/bin/env bash
# The prepared GPU check (bench/gpu_check.py) under its 8-minute limit. Run it from anywhere on a
# machine with a GPU (or without: it then runs the same steps at tiny sizes). Arguments go to the
# module (e.g. --models sd15). The log, the JSON figures and the GPU's name land in
# ${GPU_CHECK_OUT:-out/gpu-check}; the exit status is the check's (1: a check failed).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${GPU_CHECK_OUT:-out/gpu-check}"
mkdir -p "$out"
python="${PYTHON:-.venv/bin/python}"
[ -x "$python" ] || python=python3
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/gpu.csv" || true
fi
timeout 480 "$python" -m bench.gpu_check --json "$out/gpu_check.json" "$@" 2>&1 | tee "$out/gpu_check.log"
