#!/usr/bin/env bash
# The project's test command (README "Run the tests"): Rust unit, property, integration and
# multi-process tests in release mode, then the Python checkpoint test.
# Needs: cargo; python3 with pip; for the wgpu smoke test a Vulkan driver (on Debian without a
# GPU: mesa-vulkan-drivers, which provides lavapipe). Set DILOCO_SKIP_WGPU=1 to skip that test
# on a machine with no Vulkan at all.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/diloco-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

python3 -c 'import safetensors, numpy' 2>/dev/null || python3 -m pip install --quiet safetensors numpy

echo "== cargo test --release --workspace"
cargo test --release --workspace --locked

echo "== python checkpoint test"
# `cargo test` above already built the binary (integration tests use it); building it again with
# `cargo build` would pick other feature unifications and recompile burn.
DILOCO_BIN="$CARGO_TARGET_DIR/release/diloco-node" python3 tests/python/test_checkpoint.py
