#!/usr/bin/env bash
# The project's test command (README "Run the tests"): Rust unit, property, integration and
# multi-process tests in release mode, then the Python checkpoint test.
# Needs: cargo; python3 with pip; for the wgpu smoke test a Vulkan driver (on Debian without a
# GPU: mesa-vulkan-drivers, which provides lavapipe). Set DILOCO_SKIP_WGPU=1 to skip that test
# on a machine with no Vulkan at all. The dashboard's browser test needs a headless Chromium
# (Debian: chromium-headless-shell); without one it is skipped with a notice, unless
# DILOCO_REQUIRE_BROWSER=1 (as in .ci/run), which makes a missing browser a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
# The same target directory as the README's `cargo run` (./target) unless told otherwise
# (.ci/run keeps one under ~/.cache across clones).
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

python3 -c 'import safetensors, numpy' 2>/dev/null || python3 -m pip install --quiet safetensors numpy

echo "== cargo test --release --workspace"
cargo test --release --workspace --locked

echo "== python checkpoint test"
# `cargo test` above already built the binary (integration tests use it); `cargo build` or the
# README's `cargo run` would find it up to date (the workspace pins one feature set).
DILOCO_BIN="$CARGO_TARGET_DIR/release/diloco-node" python3 tests/python/test_checkpoint.py

echo "== dashboard in headless Chromium (demo --nodes 3)"
if command -v chromium-headless-shell >/dev/null || command -v chromium >/dev/null; then
  python3 tests/browser/dashboard.py --bin-dir "$CARGO_TARGET_DIR/release" \
      --artifacts "${DILOCO_ARTIFACTS:-$HOME/.cache/diloco-artifacts}"
elif [ "${DILOCO_REQUIRE_BROWSER:-0}" = 1 ]; then
  echo "no Chromium found and DILOCO_REQUIRE_BROWSER=1: apt-get install chromium-headless-shell" >&2
  exit 1
else
  echo "SKIPPED: no Chromium (apt-get install chromium-headless-shell to run it)"
fi
