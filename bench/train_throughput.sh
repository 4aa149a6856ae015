#!/usr/bin/env bash
# Training throughput and peak memory: diloco-node (the native CPU engine, burn's CPU backend
# and wgpu) vs PyTorch on CPU, same model shape, batch and sequence length, same thread count,
# each row a separate process run back to back. Results go to stdout as JSON lines.
#
#   bash bench/train_throughput.sh [STEPS] [MODELS...]
#
# BENCH_THREADS (default: all cores) is given to both: `diloco-node --threads` and
# `torch.set_num_threads`.
# Needs a release build (cargo build --release -p diloco-node) and a Python with torch
# (BENCH_PYTHON, default python3; e.g. python3 -m venv ~/.cache/bench-venv &&
#  ~/.cache/bench-venv/bin/pip install torch). Set BENCH_WGPU=0 to skip wgpu (lavapipe is slow).
# BENCH_BACKENDS (default "native cpu", plus wgpu unless BENCH_WGPU=0; e.g. "native torch") picks
# the node's backends instead; `torch` (burn's LibTorch
# backend) runs BENCH_TORCH_BIN, a build with `--features torch` (README, "LibTorch backend").
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS="${1:-20}"; shift || true
MODELS=("${@:-tiny small}")
[ $# -eq 0 ] && MODELS=(tiny small)
BIN="${CARGO_TARGET_DIR:-target}/release/diloco-node"
PY="${BENCH_PYTHON:-python3}"
DATA="${BENCH_DATA:-../shared/data/shakespeare.txt}"
BATCH="${BENCH_BATCH:-32}"; SEQ="${BENCH_SEQ:-128}"
# Both implementations get the same number of threads (default: every core).
THREADS="${BENCH_THREADS:-$(nproc)}"

peak_mb() { awk '/Maximum resident set size/ {printf "%.0f", $6/1024}' "$1"; }

for model in "${MODELS[@]}"; do
  backends=(native cpu); [ "${BENCH_WGPU:-1}" = 1 ] && backends+=(wgpu)
  [ -n "${BENCH_BACKENDS:-}" ] && read -r -a backends <<< "$BENCH_BACKENDS"
  for backend in "${backends[@]}"; do
    steps=$STEPS; [ "$backend" = wgpu ] && steps="${BENCH_WGPU_STEPS:-3}"
    bin=$BIN; [ "$backend" = torch ] && bin="${BENCH_TORCH_BIN:-$BIN}"
    /usr/bin/time -v "$bin" --threads "$THREADS" train --data "$DATA" --model "$model" --backend "$backend" \
      --steps "$steps" --batch "$BATCH" --seq "$SEQ" --eval-windows 1 --json \
      > /tmp/bench-out.json 2> /tmp/bench-time.txt || { cat /tmp/bench-time.txt; exit 1; }
    tail -1 /tmp/bench-out.json | "$PY" -c "import json,sys; r=json.load(sys.stdin); print(json.dumps({'impl':'diloco-node','backend':'$backend','model':'$model','batch':$BATCH,'seq':$SEQ,'threads':$THREADS,'steps':r['steps'],'params':r['params'],'tokens_per_s':round(r['tokens_per_s'],1),'peak_rss_mb':$(peak_mb /tmp/bench-time.txt)}))"
  done
  "$PY" bench/torch_ref.py --model "$model" --data "$DATA" --steps "$STEPS" --batch "$BATCH" --seq "$SEQ" --threads "$THREADS"
done
