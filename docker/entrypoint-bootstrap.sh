#!/bin/sh
# Entrypoint of the diloco-bootstrap image (POSIX sh: busybox in the local image, dash in the
# Debian one).
#
# Nodes have to know the bootstrap's peer id. This script learns it from the key file (kept on a
# volume, so the id survives restarts) by starting the bootstrap briefly on loopback, writes the
# full address the nodes should dial to $DILOCO_BOOTSTRAP_FILE (a volume the nodes mount
# read-only), and then execs the real bootstrap so that it gets the signals directly.
#
# Env: DILOCO_KEY (default /key/bootstrap.key), DILOCO_BOOTSTRAP_HOST (the name nodes resolve,
# default "bootstrap", the compose service), DILOCO_BOOTSTRAP_PORT (default 4001),
# DILOCO_BOOTSTRAP_FILE (default /shared/bootstrap.addr); every other DILOCO_* variable is read
# by diloco-bootstrap itself. Arguments are passed on to diloco-bootstrap.
set -eu

# An empty DILOCO_* variable (compose's "${VAR:-}") means "not set": clap would reject "".
for v in $(env | sed -n 's/^\(DILOCO_[A-Z0-9_]*\)=$/\1/p'); do unset "$v"; done

key=${DILOCO_KEY:-/key/bootstrap.key}
host=${DILOCO_BOOTSTRAP_HOST:-bootstrap}
port=${DILOCO_BOOTSTRAP_PORT:-4001}
out=${DILOCO_BOOTSTRAP_FILE:-/shared/bootstrap.addr}
unset DILOCO_BOOTSTRAP_HOST DILOCO_BOOTSTRAP_PORT DILOCO_BOOTSTRAP_FILE
export DILOCO_KEY="$key"
mkdir -p "$(dirname "$key")" "$(dirname "$out")"

tmp=$(mktemp)
# Creates the key if absent and prints /ip4/127.0.0.1/tcp/<port>/p2p/<peer id>.
# (Without the status server: the real one binds that port.)
(unset DILOCO_STATUS_ADDR; exec diloco-bootstrap --listen /ip4/127.0.0.1/tcp/0 --key "$key" --log error) >"$tmp" &
pid=$!
i=0
until grep -q /p2p/ "$tmp"; do
  if ! kill -0 "$pid" 2>/dev/null || [ "$i" -ge 300 ]; then
    echo "entrypoint: diloco-bootstrap did not print its address" >&2
    kill "$pid" 2>/dev/null || true
    exit 1
  fi
  i=$((i + 1))
  sleep 0.1
done
kill "$pid" 2>/dev/null || true
wait "$pid" 2>/dev/null || true
id=$(sed -n 's#.*/p2p/##p' "$tmp" | head -n 1)
rm -f "$tmp"
printf '/dns4/%s/tcp/%s/p2p/%s\n' "$host" "$port" "$id" >"$out.tmp"
mv "$out.tmp" "$out"
echo "entrypoint: nodes dial $(cat "$out") (written to $out)" >&2

if [ -z "${DILOCO_LISTEN:-}" ]; then
  export DILOCO_LISTEN="/ip4/0.0.0.0/tcp/$port"
fi
exec diloco-bootstrap "$@"
