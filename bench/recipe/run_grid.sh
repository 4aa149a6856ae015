#!/usr/bin/env bash
# Runs every line of a grid file (one command-line tail per line: the implementation, `torch`
# or `node`, then its flags) with JOBS at a time (default 2), one thread each, and appends each
# run's JSON report, tagged with its grid line, to OUT (a .jsonl file). Lines already in OUT
# are skipped, so an interrupted study resumes where it stopped.
#   bash bench/recipe/run_grid.sh GRID OUT [JOBS]
set -euo pipefail
grid=$1 out=$2 jobs=${3:-2}
here=$(cd "$(dirname "$0")/../.." && pwd)
py=${BENCH_PYTHON:-$HOME/.cache/bench-venv/bin/python}
bin=${DILOCO_BIN:-${CARGO_TARGET_DIR:-$here/target}/release/diloco-node}
data=${DATA:-$here/../shared/data/shakespeare.txt}
touch "$out"
run_one() {
  local line=$1
  if grep -qF "\"grid\": \"$line\"" "$out"; then return 0; fi
  local impl=${line%% *} flags=${line#* } res
  case $impl in
    torch) res=$("$py" "$here/bench/torch_diloco.py" --data "$data" --threads 1 --json $flags | tail -n 1) ;;
    node) res=$(RAYON_NUM_THREADS=1 "$bin" simulate --data "$data" --backend cpu --json $flags 2>/dev/null | tail -n 1) ;;
    *) echo "unknown implementation '$impl' in: $line" >&2; return 1 ;;
  esac
  python3 -c 'import json,sys; r=json.loads(sys.argv[1]); r["grid"]=sys.argv[2]; r.pop("global",None); print(json.dumps(r))' "$res" "$line" >> "$out"
  echo "done: $line -> $(python3 -c 'import json,sys; print(round(json.loads(sys.argv[1])["eval_loss"],4))' "$res")"
}
export -f run_one; export out py bin data here
grep -v '^\s*\(#\|$\)' "$grid" | tr '\n' '\0' | xargs -0 -P "$jobs" -I{} bash -c 'run_one "$@"' _ {}
