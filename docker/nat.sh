#!/usr/bin/env bash
# NAT traversal test: a bootstrap peer and one node on a "public" Docker network, and two nodes
# each behind its own NAT router (a container that forwards and masquerades, set up from the
# host with nsenter + iptables, so the images need no tools). Nothing outside can dial the NATed
# nodes. Node A is told it is behind NAT (--relay-listen); node B must find out with AutoNAT
# (every peer runs with --private-network, since all addresses here are private). Both listen
# through the bootstrap's relay, and DCUtR must punch a direct TCP connection between them
# through both NATs. Checks: node B's AutoNAT concluded it is unreachable; all three nodes agree
# on one global_hash at round >= 5 in a group of 3; router A holds an established, masqueraded
# connection between the two NATed nodes (the hole punched). Prints every container's logs on
# failure; cleans up on exit (KEEP=1 keeps everything).
#
# `bash docker/nat.sh relay` tests the fallback instead: both NATs map every connection to a
# random port (symmetric NAT, --random-fully), so no hole can be punched, there is no public
# node, and the bootstrap peer raises its relay limits (--relay-max-circuit-bytes 1 GiB): the two
# NATed nodes must train together through the relay alone (group of 2 at round >= 5, no direct
# connection between them).
#   bash docker/nat.sh [punch|relay]
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-punch}"
case "$mode" in punch|relay) ;; *) echo "usage: bash docker/nat.sh [punch|relay]" >&2; exit 2 ;; esac
for t in nsenter iptables curl python3; do
  command -v "$t" >/dev/null || { echo "nat.sh: needs $t on the host" >&2; exit 1; }
done
if ! docker image inspect diloco-node:local diloco-bootstrap:local >/dev/null 2>&1; then
  bash docker/build.sh
fi

P="diloco-nat-$$"
work=$(mktemp -d)
cleanup() {
  if [ "${KEEP:-0}" != 1 ]; then
    docker rm -f "${P}_boot" "${P}_ra" "${P}_rb" "${P}_np" "${P}_na" "${P}_nb" >/dev/null 2>&1 || true
    docker network rm "${P}_pub" "${P}_lana" "${P}_lanb" >/dev/null 2>&1 || true
    rm -rf "$work"
  fi
}
trap cleanup EXIT
fail() {
  echo "nat.sh: FAILED: $*" >&2
  for c in boot ra rb np na nb; do
    echo "---- logs of ${P}_$c" >&2
    docker logs --tail 60 "${P}_$c" 2>&1 | sed 's/\x1b\[[0-9;]*m//g' >&2 || true
  done
  exit 1
}
pid_of() { docker inspect -f '{{.State.Pid}}' "$1"; }

# Three /24 subnets that no other Docker network uses: try blocks of 10.x.0.0 until Docker
# accepts all three (it refuses overlapping pools). Not --internal: Docker's isolation rules for
# internal networks also drop bridged frames addressed outside the subnet, i.e. everything sent
# to the router. Each LAN stays unreachable from the public network all the same (Docker
# isolates networks from each other), and its nodes' default route goes through their router.
made=0
for s in $(seq 16 4 236); do
  pub="10.${s}.0"; lana="10.$((s + 1)).0"; lanb="10.$((s + 2)).0"
  if docker network create --subnet "$pub.0/24" "${P}_pub" >/dev/null 2>&1; then
    if docker network create --subnet "$lana.0/24" "${P}_lana" >/dev/null 2>&1; then
      if docker network create --subnet "$lanb.0/24" "${P}_lanb" >/dev/null 2>&1; then
        made=1; break
      fi
      docker network rm "${P}_lana" >/dev/null
    fi
    docker network rm "${P}_pub" >/dev/null
  fi
done
[ "$made" = 1 ] || fail "no free 10.x.0.0/24 subnets for the test networks"

boot_env=(-e DILOCO_BOOTSTRAP_HOST="$pub.2" -e DILOCO_PRIVATE_NETWORK=true)
masq=(-j MASQUERADE)
if [ "$mode" = relay ]; then
  boot_env+=(-e DILOCO_RELAY_MAX_CIRCUIT_BYTES=1073741824 -e DILOCO_RELAY_MAX_CIRCUIT_SECS=3600)
  masq+=(--random-fully)
fi
docker run -d --name "${P}_boot" --network "${P}_pub" --ip "$pub.2" "${boot_env[@]}" \
  -v "$work:/shared" diloco-bootstrap:local >/dev/null
for r in a b; do
  lan=$([ $r = a ] && echo "$lana" || echo "$lanb")
  docker run -d --name "${P}_r$r" --network "${P}_pub" --ip "$pub.1$([ $r = a ] && echo 1 || echo 2)" \
    --sysctl net.ipv4.ip_forward=1 --entrypoint /bin/busybox diloco-node:local sleep 100000 >/dev/null
  docker network connect --ip "$lan.2" "${P}_lan$r" "${P}_r$r"
  nsenter -t "$(pid_of "${P}_r$r")" -n iptables -t nat -A POSTROUTING -s "$lan.0/24" ! -d "$lan.0/24" "${masq[@]}"
  # Drop unsolicited inbound SYNs instead of answering them with a reset, as RFC 5382 (REQ-4)
  # asks of a NAT and home routers do: a hole punch's first SYN may arrive before the other
  # side's SYN has opened the mapping, and a reset would tear down the mapping it just made.
  nsenter -t "$(pid_of "${P}_r$r")" -n iptables -A INPUT -p tcp --syn -j DROP
done
for _ in $(seq 100); do [ -s "$work/bootstrap.addr" ] && break; sleep 0.1; done
[ -s "$work/bootstrap.addr" ] || fail "the bootstrap peer wrote no address"
addr=$(sed 's#/dns4/#/ip4/#' "$work/bootstrap.addr")
echo "[$(date +%T)] bootstrap $addr"

node_args=(join --listen /ip4/0.0.0.0/tcp/4001 --status-addr 0.0.0.0:8080 --run-config /run.json
  --backend cpu --genesis-wait 5)
env_args=(-v "$PWD/docker/run.json:/run.json:ro" -e "DILOCO_BOOTSTRAP=$addr" -e DILOCO_PRIVATE_NETWORK=true
  -e "DILOCO_LOG=${NAT_LOG:-info,libp2p_gossipsub=error,libp2p_kad=error}")
if [ "$mode" = punch ]; then
  docker run -d --name "${P}_np" --network "${P}_pub" --ip "$pub.20" "${env_args[@]}" \
    diloco-node:local "${node_args[@]}" >/dev/null
  ips=("$pub.20" "$lana.3" "$lanb.3")
else
  ips=("$lana.3" "$lanb.3")
fi
group=${#ips[@]}
for r in a b; do
  lan=$([ $r = a ] && echo "$lana" || echo "$lanb")
  relay=$([ $r = a ] && echo true || echo false)
  docker create --name "${P}_n$r" --network "${P}_lan$r" --ip "$lan.3" "${env_args[@]}" \
    -e DILOCO_RELAY_LISTEN=$relay -e DILOCO_START_FILE=/tmp/routed \
    diloco-node:local "${node_args[@]}" >/dev/null
  # Route through the router before the node sends anything: its entrypoint waits for
  # /tmp/routed. (This used to pause the container, which failed on a loaded machine with
  # "OCI runtime pause failed: unable to freeze".)
  docker start "${P}_n$r" >/dev/null
  nsenter -t "$(pid_of "${P}_n$r")" -n ip route replace default via "$lan.2"
  docker exec "${P}_n$r" sh -c ': > /tmp/routed'
done

status() { curl -s -m 2 "$1:8080/status" | python3 -c 'import json,sys; s=json.load(sys.stdin); print(s["round"], s["group_size"], s["global_hash"])' 2>/dev/null || echo "- - -"; }
end=$(( $(date +%s) + 240 ))
agreed=""
while [ "$(date +%s)" -lt "$end" ]; do
  line=()
  for ip in "${ips[@]}"; do line+=("$(status "$ip")"); done
  read -r r0 g0 h0 <<<"${line[0]}"
  ok=1
  for l in "${line[@]}"; do
    read -r r g h <<<"$l"
    [ "$r" = "$r0" ] && [ "$g" = "$group" ] && [ "$h" = "$h0" ] && [ -n "$h" ] && [ "$h" != - ] || ok=0
  done
  if [ "$ok" = 1 ] && [ "$r0" -ge 5 ]; then agreed="$r0 ${h0:0:16}"; break; fi
  sleep 2
done
[ -n "$agreed" ] || fail "nodes did not agree at round >= 5 in a group of $group within 240 s; last: ${line[*]}"
echo "[$(date +%T)] agree: $group nodes (2 behind NAT) at round ${agreed}"

# Node B was not told it is behind NAT: AutoNAT must find out (it probes 5 s after start, and
# again every 90 s while it has no answer), and put it on the relay.
nat_line=""
for _ in $(seq 120); do
  nat_line=$(docker logs "${P}_nb" 2>&1 | sed 's/\x1b\[[0-9;]*m//g' | grep "not reachable directly (AutoNAT)" | head -1 || true)
  [ -n "$nat_line" ] && break
  sleep 1
done
[ -n "$nat_line" ] || fail "node B's AutoNAT did not conclude it is unreachable within 120 s of agreeing"
started=$(docker inspect -f '{{.State.StartedAt}}' "${P}_nb")
echo "[$(date +%T)] node B: AutoNAT found it unreachable $(python3 -c 'import sys,datetime as d
p=lambda s: d.datetime.fromisoformat(s[:26].rstrip("Z")+"+00:00")
print("%.1f s" % (p(sys.argv[2])-p(sys.argv[1])).total_seconds())' "$started" "${nat_line%% *}") after it started; it listens through the relay"

direct() {
  nsenter -t "$(pid_of "${P}_ra")" -n cat /proc/net/nf_conntrack 2>/dev/null \
    | grep -c "ESTABLISHED src=$lana.3 dst=$pub.12 " || true
}
if [ "$mode" = relay ]; then
  # Everything between the two went through the relay: no direct connection through the NATs.
  [ "$(direct)" = 0 ] || fail "a direct connection between the NATed nodes exists, so the relay path was not what carried the run"
  rx=$(curl -s -m 2 "$lana.3:8080/status" | python3 -c 'import json,sys; print(json.load(sys.stdin)["bytes_received"])')
  echo "[$(date +%T)] relay only: no direct connection; node A received $rx bytes, all through the relay"
  echo "nat test (relay) passed"
  exit 0
fi

# The punched hole: router A tracks an established connection from node A to router B's public
# address (node B's NAT mapping), which only DCUtR's simultaneous dial can have opened.
# DCUtR starts once both relay reservations exist and the nodes meet over the relay; the
# group may agree before that (traffic between the NATed nodes can go by the public node).
punched=0
for _ in $(seq 90); do
  punched=$(direct)
  [ "$punched" -ge 1 ] && break
  sleep 1
done
[ "$punched" -ge 1 ] || fail "no direct connection between the two NATed nodes within 90 s of agreeing (router A's conntrack has none to $pub.12)"
echo "[$(date +%T)] hole punched: $punched direct connection(s) between the NATed nodes through both NATs"
echo "nat test (punch) passed"
