#!/usr/bin/env bash
# Compose test: bootstrap + 3 nodes on a private network. Checks that they converge (>= 3 rounds,
# one global_hash, falling loss), that the others keep completing rounds while one node is
# SIGKILLed mid-round and that it resyncs when started again, that a node disconnected from the
# network and reconnected recovers and matches, and that SIGTERM exits 0. Prints every
# container's logs on failure; removes its containers, volumes and network on exit (KEEP=1
# keeps them). Needs the images of docker/build.sh (built here if absent).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! docker image inspect diloco-node:local diloco-bootstrap:local >/dev/null 2>&1; then
  bash docker/build.sh
fi
exec python3 docker/testnet.py test
