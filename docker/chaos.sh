#!/usr/bin/env bash
# Chaos test: bootstrap + 3 nodes; every 15 s one random node is killed (SIGKILL, or SIGTERM,
# which must exit 0) and started again a few seconds later, for DURATION seconds (default 180),
# one failure at a time (before each kill the last victim must be back in the group and caught
# up with it, within 90 s). Then all nodes must hold the same global_hash, and the network must never have gone
# longer than a round's timeouts allow (straggler + aggregation + 2 x attempt timeout of
# docker/run.json) without deciding a round. CHAOS_SEED=N replays a schedule;
# CHAOS_KILL_PHASE=training kills only while the victim trains. Prints every container's logs on
# failure; cleans up on exit (KEEP=1 keeps the containers).
#   bash docker/chaos.sh [DURATION]
set -euo pipefail
cd "$(dirname "$0")/.."
if ! docker image inspect diloco-node:local diloco-bootstrap:local >/dev/null 2>&1; then
  bash docker/build.sh
fi
exec python3 docker/testnet.py chaos "${1:-180}"
