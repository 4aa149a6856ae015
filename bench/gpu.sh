#!/usr/bin/env bash
# GPU training throughput, one prepared script for a machine with an NVIDIA GPU (< 8 minutes):
# diloco-node on wgpu (Vulkan) and on burn's CUDA backend, and PyTorch on CUDA, same model
# shapes and batch, each printing one JSON line with tokens/s, peak host RSS and peak GPU memory.
#
#   bash bench/gpu.sh                      # builds the node with --features gpu-fast,cuda
#   GPU_BIN=path/to/diloco-node bash bench/gpu.sh   # or uses a binary built elsewhere
#
# Building needs the crates (cargo fetch) and, for `cuda`, internet access: cubecl-cuda's build
# downloads an LLVM bundle. On a machine without network, build elsewhere and pass GPU_BIN.
#
# Env: GPU_MODELS (default "small base"), GPU_BATCH (16), GPU_SEQ (256), GPU_STEPS_small (40),
# GPU_STEPS_base (12), BENCH_PYTHON (python3 with torch+CUDA; its rows are skipped without it),
# BENCH_DATA (../shared/data/shakespeare.txt). A backend that does not start (no Vulkan driver,
# a binary without CUDA) prints a row with "error" and the script goes on.
set -uo pipefail
cd "$(dirname "$0")/.."
DATA="${BENCH_DATA:-../shared/data/shakespeare.txt}"
PY="${BENCH_PYTHON:-python3}"
BATCH="${GPU_BATCH:-16}"; SEQ="${GPU_SEQ:-256}"
read -r -a MODELS <<< "${GPU_MODELS:-small base}"
OUT="${GPU_OUT:-${TMPDIR:-/tmp}/diloco-gpu-bench}"; mkdir -p "$OUT"

json() { "$PY" -c 'import json,sys; print(json.dumps(dict(a.split("=",1) for a in sys.argv[1:])))' "$@" 2>/dev/null \
  || echo "{\"note\": \"$*\"}"; }

if ! command -v nvidia-smi >/dev/null; then
  echo "bench/gpu.sh: no nvidia-smi here; this script is for a machine with an NVIDIA GPU" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | sed 's/^/# gpu: /'
[ -f "$DATA" ] || { echo "bench/gpu.sh: no corpus at $DATA (set BENCH_DATA)" >&2; exit 2; }

BIN="${GPU_BIN:-}"
if [ -z "$BIN" ]; then
  T="${CARGO_TARGET_DIR:-target}"
  start=$(date +%s)
  if cargo build --release --locked -p diloco-node --features gpu-fast,cuda >"$OUT/build.log" 2>&1; then
    echo "# built with --features gpu-fast,cuda in $(( $(date +%s) - start )) s"
  else
    echo "# the cuda feature did not build (tail of $OUT/build.log below); building gpu-fast only"
    tail -5 "$OUT/build.log" | sed 's/^/#   /'
    cargo build --release --locked -p diloco-node --features gpu-fast >"$OUT/build.log" 2>&1 \
      || { tail -20 "$OUT/build.log"; exit 1; }
    echo "# built with --features gpu-fast in $(( $(date +%s) - start )) s"
  fi
  BIN="$T/release/diloco-node"
fi

# Peak GPU memory of the whole device while a command runs (sampled every 200 ms), in MiB.
gpu_peak() {
  local log="$1"; shift
  ( while :; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits; sleep 0.2; done ) >"$log" &
  local poll=$!
  "$@"; local rc=$?
  kill "$poll" 2>/dev/null; wait "$poll" 2>/dev/null
  return $rc
}
base_mem=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)

for model in "${MODELS[@]}"; do
  steps_var="GPU_STEPS_$model"; steps="${!steps_var:-20}"
  for backend in wgpu cuda; do
    if gpu_peak "$OUT/mem.txt" /usr/bin/time -v "$BIN" train --data "$DATA" --model "$model" \
        --backend "$backend" --steps "$steps" --warmup 5 --batch "$BATCH" --seq "$SEQ" \
        --eval-windows 1 --json >"$OUT/out.json" 2>"$OUT/err.txt"; then
      rss=$(awk '/Maximum resident set size/ {printf "%.0f", $6/1024}' "$OUT/err.txt")
      peak=$(sort -n "$OUT/mem.txt" | tail -1)
      device=$(grep -o 'device=[^ ]*.*' "$OUT/err.txt" | head -1 | cut -c1-80)
      tail -1 "$OUT/out.json" | "$PY" -c "import json,sys; r=json.load(sys.stdin); print(json.dumps({'impl':'diloco-node','backend':'$backend','model':'$model','batch':$BATCH,'seq':$SEQ,'steps':r['steps'],'params':r['params'],'tokens_per_s':round(r['tokens_per_s'],1),'peak_rss_mb':$rss,'gpu_peak_mb':${peak:-0}-${base_mem:-0},'device':'''$device'''}))" \
        || { echo "# diloco-node $backend $model:"; tail -1 "$OUT/out.json"; }
    else
      json impl=diloco-node backend="$backend" model="$model" \
        error="$(grep -m1 -i 'error' "$OUT/err.txt" | cut -c1-200)"
    fi
  done
  if "$PY" -c 'import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    "$PY" bench/torch_ref.py --model "$model" --data "$DATA" --steps "$steps" --batch "$BATCH" \
      --seq "$SEQ" --device cuda || json impl=pytorch model="$model" error="torch_ref.py failed"
  else
    json impl=pytorch model="$model" error="no PyTorch with CUDA at $PY (set BENCH_PYTHON)"
  fi
done
