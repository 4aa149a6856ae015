#!/usr/bin/env bash
# Builds diloco-node:local and diloco-bootstrap:local with no registry: FROM scratch plus the two
# release binaries (stripped), the glibc libraries that ldd lists for them, and a static busybox
# for the entrypoint scripts (docker/Dockerfile.local). Same layout and entrypoints as the images
# of docker/Dockerfile, which builds from source on a normal base image.
#
# Binaries come from $CARGO_TARGET_DIR/release (default ./target, as for `cargo run`; .ci/run
# sets ~/.cache/diloco-target); when absent they are built with the test build.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
bin="$CARGO_TARGET_DIR/release"
if [ ! -x "$bin/diloco-node" ] || [ ! -x "$bin/diloco-bootstrap" ]; then
  echo "== build.sh: binaries missing in $bin; building them (cargo test --no-run)"
  cargo test --release --workspace --no-run --locked
fi

busybox=""
for b in /bin/busybox /usr/bin/busybox; do
  if [ -x "$b" ] && ! ldd "$b" >/dev/null 2>&1; then busybox=$b; break; fi  # static only
done
if [ -z "$busybox" ]; then
  echo "== build.sh: apt-get install busybox-static (shell for the entrypoints)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq busybox-static >/dev/null 2>&1 || {
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq busybox-static
  }
  busybox=/bin/busybox
fi

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx"/base/{bin,usr/bin,etc,tmp} "$ctx"/node/usr/local/bin "$ctx"/bootstrap/usr/local/bin
chmod 1777 "$ctx/base/tmp"

# Shared libraries (and the dynamic loader) of both binaries, at the paths ldd reports.
for lib in $(ldd "$bin/diloco-node" "$bin/diloco-bootstrap" | grep -o '/[^ ]*\.so[^ ]*' | sort -u); do
  mkdir -p "$ctx/base$(dirname "$lib")"
  cp -L "$lib" "$ctx/base$lib"
done

cp "$busybox" "$ctx/base/bin/busybox"
for applet in sh awk cat dirname env grep head kill ls mkdir mktemp mv nslookup ps rm sed sleep; do
  ln -s busybox "$ctx/base/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$ctx/base/etc/passwd"
printf 'root:x:0:\n' >"$ctx/base/etc/group"
printf 'hosts: files dns\n' >"$ctx/base/etc/nsswitch.conf"

strip -o "$ctx/node/usr/local/bin/diloco-node" "$bin/diloco-node"
strip -o "$ctx/bootstrap/usr/local/bin/diloco-bootstrap" "$bin/diloco-bootstrap"
install -m 0755 docker/entrypoint-node.sh "$ctx/node/usr/local/bin/diloco-node-entrypoint"
install -m 0755 docker/entrypoint-bootstrap.sh "$ctx/bootstrap/usr/local/bin/diloco-bootstrap-entrypoint"
cp docker/Dockerfile.local "$ctx/Dockerfile"

# Docker 20.10 without buildx: the classic builder is fine for COPY-only images.
if ! docker buildx version >/dev/null 2>&1; then export DOCKER_BUILDKIT=0; fi
for target in bootstrap node; do
  echo "== build.sh: diloco-$target:local"
  docker build -q --target "$target" -t "diloco-$target:local" "$ctx" >/dev/null
done
docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E '^diloco-(node|bootstrap):local ' |
  sed 's/^/== build.sh: image /'
