#!/usr/bin/env bash
# The GPU check: the GPU paths (score's --gpus-per-actor, Serve's gpus_per_replica, train's --use-gpu,
# --jit-compile/--mixed-precision) on one NVIDIA GPU, inside a ten-minute lease. The development
# machines have no GPU, so this runs where one is lent: each step is one command under `timeout`,
# on a private local Ray of its own (RAY_ADDRESS unset), the cheapest and most-needed figure first.
#
#   bash bench/gpu_check.sh [RESULTS_DIR]   # from the repository root: default bench/results; lent: "$OUT"
#
# Writes to RESULTS_DIR: gpu_score.json and gpu_score_accelerated.json (bench/score_throughput.py
# --archive-images: eyeray.score.run end to end and the bare model), gpu_serve.json and its plot
# (bench/serve_load.py --gpus-per-replica 1), gpu_samples.csv (nvidia-smi once a second) and
# gpu_check.json (each step: status, seconds, why it failed, GPU use while it ran; training metrics).
# Settings (environment): MODEL=vgg16:224 IMAGES=2000 BUDGET_S=540 PYTHON=python3.
# Without an NVIDIA GPU it writes nothing and exits 0; exit 1 when a step failed, 3 when eyeray or
# its packages are missing and `pip install -e ".[gpu,bench]"` could not install them.
set -uo pipefail # not -e: a failed step is recorded, and the next one still runs
cd "$(dirname "$0")/.." || exit 3

RESULTS=${1:-bench/results}
MODEL=${MODEL:-vgg16:224}
IMAGES=${IMAGES:-2000}
BUDGET_S=${BUDGET_S:-540}
PY=${PYTHON:-$(command -v python3 || command -v python)}
BACKBONE=${MODEL%%:*}
SIZE=${MODEL##*:}
DEADLINE=$((SECONDS + BUDGET_S))

if ! GPU=$(timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1); then
  echo "gpu_check: no NVIDIA GPU here (nvidia-smi: ${GPU:-not found}); nothing to measure"
  exit 0
fi
echo "gpu_check: $GPU"

WORK=$(mktemp -d /tmp/eyeray-gpu-check.XXXXXX)
mkdir -p "$RESULTS"
unset RAY_ADDRESS # every step starts a private local Ray, never someone's cluster
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
export TF_CPP_MIN_LOG_LEVEL=2 TF_FORCE_GPU_ALLOW_GROWTH=true # a driver and its Ray workers share the GPU
: >"$WORK/steps.tsv"

# GPU utilisation and memory once a second while the steps run: evidence that each step used the GPU.
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits -l 1 \
  >"$RESULTS/gpu_samples.csv" 2>/dev/null &
SAMPLER=$!
trap 'kill "$SAMPLER" 2>/dev/null' EXIT

# step NAME LIMIT_S COMMAND...: run COMMAND under `timeout` (cut to what is left of BUDGET_S), its log
# in $WORK/NAME.log, its record as one line of $WORK/steps.tsv.
step() {
  local name=$1 limit=$2
  shift 2
  local left=$((DEADLINE - SECONDS - 15)) # room for `timeout -k`'s grace and the summary
  ((limit > left)) && limit=$left
  if ((limit < 30)); then
    printf '%s\tskipped\t0\tnot started: %ss of the %ss budget left\t\t\t%s\n' "$name" "$left" "$BUDGET_S" "$*" \
      >>"$WORK/steps.tsv"
    echo "gpu_check: SKIPPED $name: budget spent"
    return
  fi
  echo "gpu_check: $name (limit ${limit}s): $*"
  local t0=$SECONDS start rc=0 status=ran reason=""
  start=$(date '+%Y/%m/%d %H:%M:%S') # nvidia-smi's timestamp format, for the samples of this step
  timeout -k 10 "$limit" "$@" >"$WORK/$name.log" 2>&1 || rc=$?
  if ((rc == 124 || rc == 137)); then
    status=failed reason="did not finish within its ${limit}s limit"
  elif ((rc != 0)); then
    status=failed reason="exit $rc: $(grep -v '^[[:space:]]*$' "$WORK/$name.log" | tail -n 1 | tr '\t' ' ' | cut -c1-300)"
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - t0))" "$reason" "$start" \
    "$(date '+%Y/%m/%d %H:%M:%S')" "$*" >>"$WORK/steps.tsv"
  echo "gpu_check: $name $status in $((SECONDS - t0))s $reason"
  [[ $status == ran ]] || tail -n 15 "$WORK/$name.log"
}

if ! "$PY" -c 'import eyeray, ray.serve, tensorflow, psutil, httpx' 2>/dev/null; then
  step install 240 "$PY" -m pip install -q -e ".[gpu,bench]"
fi
step tensorflow 60 "$PY" -c 'import sys, tensorflow as tf; g = tf.config.list_physical_devices("GPU"); print("TensorFlow", tf.__version__, "sees GPUs:", g); sys.exit(not g)'

if grep -q $'^install\tfailed' "$WORK/steps.tsv"; then
  EXIT=3
elif grep -q $'^tensorflow\tran' "$WORK/steps.tsv"; then
  SCORE=("$PY" bench/score_throughput.py --archive-images "$IMAGES" --model "$MODEL" --batch-size 64 --gpus-per-actor 1)
  TRAIN=(eyeray train oct --backbone "$BACKBONE" --image-size "$SIZE" --weights none --epochs 1 --batch-size 64 --workers 1 --use-gpu)
  step score 150 "${SCORE[@]}" --out "$RESULTS/gpu_score.json"
  step serve 150 "$PY" bench/serve_load.py --backbone "$BACKBONE" --image-size "$SIZE" --gpus-per-replica 1 --cpus "$(nproc)" --clients 1 16 --requests 128 --out "$RESULTS/gpu_serve.json"
  step train 150 "${TRAIN[@]}" --output "$WORK/train"
  step score_accelerated 100 "${SCORE[@]}" --jit-compile --mixed-precision --out "$RESULTS/gpu_score_accelerated.json"
  step train_mixed_precision 100 "${TRAIN[@]}" --mixed-precision --output "$WORK/train_mixed_precision"
fi
kill "$SAMPLER" 2>/dev/null

# The summary, gpu_check.json: the steps' records, GPU use while each ran, the training metrics.
"$PY" - "$WORK" "$RESULTS" "$GPU" "$MODEL" "$IMAGES" "$BUDGET_S" "$SECONDS" <<'EOF'
import csv, json, platform, sys
from pathlib import Path

work, results, gpu, model, images, budget, seconds = sys.argv[1:]
samples = [r for r in csv.reader(open(Path(results, "gpu_samples.csv"))) if len(r) >= 3]
steps = []
for line in Path(work, "steps.tsv").read_text().splitlines():
    name, status, secs, reason, start, end, command = line.split("\t")
    record = {"name": name, "status": status, "seconds": int(secs), "reason": reason, "command": command}
    rows = [r for r in samples if start <= r[0].strip()[:19] <= end]
    if rows:
        util, mem = [float(r[1]) for r in rows], [float(r[2]) for r in rows]
        record["gpu_while_running"] = {
            "samples": len(rows), "max_utilization_pct": max(util),
            "mean_utilization_pct": round(sum(util) / len(util), 1), "max_memory_used_mib": max(mem),
        }
    metrics = Path(work, name, "report", "metrics.json")
    if metrics.is_file():
        record["metrics"] = {k: v for k, v in json.loads(metrics.read_text()).items() if type(v) in (int, float)}
    steps.append(record)
summary = {
    "check": "gpu_check", "host": platform.node(), "gpu": gpu, "model": model, "images": int(images),
    "budget_s": int(budget), "seconds": int(seconds), "logs": work, "steps": steps,
    "counts": {s: sum(r["status"] == s for r in steps) for s in ("ran", "skipped", "failed")},
}
Path(results, "gpu_check.json").write_text(json.dumps(summary, indent=2) + "\n")
print(f"gpu_check: {summary['counts']} in {seconds}s; wrote {results}/gpu_check.json")
EOF
if [[ -n ${EXIT:-} ]]; then exit "$EXIT"; fi
! grep -qE $'\t(failed|skipped)\t' "$WORK/steps.tsv" || exit 1
