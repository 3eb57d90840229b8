#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): train, score, serve and the bare model's images/s on an NVIDIA
# GPU within 8 minutes, bench/results/gpu_*.json; on a machine without one, the GPU steps are skipped.
#   bash bench/gpu_check.sh [--model vgg16:224] [--images 2048] [--out bench/results] [--steps ...]
set -euo pipefail
cd "$(dirname "$0")/.."
# `python` as everywhere in this repo; `python3` where only that exists (bare GPU images). PYTHON overrides.
PYTHON="${PYTHON:-$(command -v python || command -v python3 || true)}"
if [[ -z "$PYTHON" ]]; then
  echo "gpu_check: cannot run: no python or python3 on PATH" >&2
  exit 3
fi
exec "$PYTHON" bench/gpu_check.py "$@"
