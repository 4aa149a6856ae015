#!/bin/sh
# Entrypoint of the diloco-node image (POSIX sh: busybox in the local image, dash in the Debian
# one). Arguments are passed to diloco-node (default: join); the node is exec'd, so SIGTERM
# reaches it directly (it saves a checkpoint and exits 0).
#
# For `join` it fills in what a compose replica cannot be told in advance:
# - DILOCO_BOOTSTRAP, when unset: read from $DILOCO_BOOTSTRAP_FILE (default
#   /shared/bootstrap.addr, written by the bootstrap container), waiting up to
#   $DILOCO_BOOTSTRAP_WAIT seconds (default 120) for it to appear.
# - DILOCO_START_FILE, when set: wait (up to 60 s) until that file exists before anything else,
#   so a test harness can set the container's network up first (docker/nat.sh routes each
#   node through its NAT router, then creates the file).
# - DILOCO_CHECKPOINT_DIR, when unset and /checkpoints is mounted: /checkpoints/<replica>, where
#   <replica> is this container's compose name (e.g. testnet-node-2, found by a reverse DNS
#   lookup of its own address on the compose network) or, failing that, its hostname. A replica
#   restarted or recreated under the same name finds its checkpoint and its identity key there.
set -eu

# An empty DILOCO_* variable (compose's "${VAR:-}") means "not set": clap would reject "".
for v in $(env | sed -n 's/^\(DILOCO_[A-Z0-9_]*\)=$/\1/p'); do unset "$v"; done

[ $# -gt 0 ] || set -- join

if [ -n "${DILOCO_START_FILE:-}" ]; then
  i=0
  until [ -e "$DILOCO_START_FILE" ]; do
    if [ "$i" -ge 300 ]; then
      echo "entrypoint: $DILOCO_START_FILE did not appear within 60 s" >&2
      exit 1
    fi
    i=$((i + 1))
    sleep 0.2
  done
fi

replica_name() {
  host=$(cat /proc/sys/kernel/hostname)
  ip=$(awk -v h="$host" '$2 == h { print $1; exit }' /etc/hosts 2>/dev/null || true)
  name=
  if [ -n "$ip" ]; then
    if command -v getent >/dev/null 2>&1; then
      name=$(getent hosts "$ip" | awk '{ print $2; exit }')
    elif command -v nslookup >/dev/null 2>&1; then
      name=$(nslookup "$ip" 2>/dev/null | sed -n 's/.*name = //p' | head -n 1)
    fi
  fi
  # "proj_node_2.proj_net" (compose v1) or "proj-node-2.proj_net" (v2): keep the first label.
  name=${name%%.*}
  case "$name" in
    "" | "$host" | *[!A-Za-z0-9_.-]*) name=$host ;;
  esac
  echo "$name"
}

if [ "$1" = join ]; then
  if [ -z "${DILOCO_BOOTSTRAP:-}" ]; then
    f=${DILOCO_BOOTSTRAP_FILE:-/shared/bootstrap.addr}
    wait_s=${DILOCO_BOOTSTRAP_WAIT:-120}
    i=0
    until [ -s "$f" ]; do
      if [ "$i" -ge $((wait_s * 5)) ]; then
        echo "entrypoint: no bootstrap address in $f after ${wait_s}s; set DILOCO_BOOTSTRAP" >&2
        exit 1
      fi
      i=$((i + 1))
      sleep 0.2
    done
    DILOCO_BOOTSTRAP=$(cat "$f")
    export DILOCO_BOOTSTRAP
  fi
  if [ -z "${DILOCO_CHECKPOINT_DIR:-}" ] && [ -d /checkpoints ]; then
    DILOCO_CHECKPOINT_DIR=/checkpoints/$(replica_name)
    export DILOCO_CHECKPOINT_DIR
  fi
  echo "entrypoint: bootstrap ${DILOCO_BOOTSTRAP}, checkpoints in ${DILOCO_CHECKPOINT_DIR:-(none)}" >&2
fi
unset DILOCO_BOOTSTRAP_FILE DILOCO_BOOTSTRAP_WAIT DILOCO_START_FILE
exec diloco-node "$@"
