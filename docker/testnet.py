#!/usr/bin/env python3
"""Compose testnet checks, run by docker/test.sh and docker/chaos.sh (stdlib only).

  python3 docker/testnet.py test            # bootstrap + 3 nodes: agree, kill, restart, partition
  python3 docker/testnet.py chaos [SECONDS] # kill/restart a random node every 15 s, then check

Each run uses its own compose project (diloco-<kind>-<pid>), so runs do not collide, and removes
its containers, volumes and network on exit (KEEP=1 keeps them). On failure every container's
logs are printed. Status comes from GET /status on the node's port published on 127.0.0.1, or,
when that does not answer (e.g. while the node is disconnected from its network), from
`docker exec <container> diloco-node health`.

All waits poll with a deadline; none sleeps for a fixed time hoping the state is reached.
"""

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
COMPOSE_FILE = os.path.join(HERE, "compose.yml")
RUN_CONFIG = json.load(open(os.path.join(HERE, "run.json")))


class Failure(Exception):
    pass


def check_bootstrap_dashboard(net, nodes):
    """The bootstrap container serves its dashboard and knows the nodes (published port)."""
    r = sh(net.compose + ["port", "bootstrap", "8080"], check=False, timeout=20)
    line = r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else ""
    if not line.startswith("127.0.0.1:"):
        raise Failure(f"the bootstrap's port 8080 is not published: {r.stdout} {r.stderr}")
    base = "http://" + line
    with urllib.request.urlopen(base + "/", timeout=5) as resp:
        page = resp.read().decode()
    with urllib.request.urlopen(base + "/status", timeout=5) as resp:
        st = json.loads(resp.read())
    if "/dashboard.js" not in page or st.get("kind") != "bootstrap" or st.get("peers", 0) < nodes:
        raise Failure(f"bootstrap dashboard: status {st}")
    log(f"bootstrap dashboard answers on {base}: {st['connections']} connections, {st['peers']} peers known")


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sh(args, check=True, timeout=120, capture=True):
    r = subprocess.run(args, capture_output=capture, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise Failure(f"{' '.join(args)} exited {r.returncode}: {r.stderr.strip()}")
    return r


def compose_cmd():
    """`docker compose` (v2 plugin) when present, else docker-compose (v1)."""
    try:
        if subprocess.run(["docker", "compose", "version"], capture_output=True,
                          timeout=30).returncode == 0:
            return ["docker", "compose"]
    except (OSError, subprocess.TimeoutExpired):
        pass
    return ["docker-compose"]


class Testnet:
    def __init__(self, kind):
        self.project = f"diloco-{kind}-{os.getpid()}"
        self.compose = compose_cmd() + ["-p", self.project, "-f", COMPOSE_FILE]
        self.ports = {}  # container id -> published host port of 8080
        self.names = {}  # container id -> container name
        # Observations: container id -> list of (time, round, global_hash)
        self.obs = {}
        self.latest = {}  # container id -> last status dict
        self.lock = threading.Lock()
        self.progress = []  # (time, max round seen across nodes) at each increase
        self.stop_poll = threading.Event()
        self.poller = None

    # -- compose / docker ----------------------------------------------------------------------
    def up(self, nodes):
        env = dict(os.environ)
        # The test's settings, not whatever the caller's shell holds for the user-facing file.
        for k in list(env):
            if k.startswith("DILOCO_") and k not in ("DILOCO_NODE_IMAGE", "DILOCO_BOOTSTRAP_IMAGE"):
                del env[k]
        env["DILOCO_GENESIS_WAIT"] = "3"
        r = subprocess.run(self.compose + ["up", "-d", "--scale", f"node={nodes}"], env=env,
                           capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise Failure(f"compose up failed: {r.stdout}\n{r.stderr}")

    def nodes(self):
        ids = sh(self.compose + ["ps", "-q", "node"]).stdout.split()
        full = []
        for cid in ids:
            name = sh(["docker", "inspect", "-f", "{{.Name}}", cid]).stdout.strip().lstrip("/")
            self.names[cid] = name
            full.append(cid)
        return sorted(full, key=lambda c: self.names[c])

    def name(self, cid):
        return self.names.get(cid, cid[:12])

    def running(self, cid):
        r = sh(["docker", "inspect", "-f", "{{.State.Running}}", cid], check=False)
        return r.stdout.strip() == "true"

    def network(self, cid):
        out = sh(["docker", "inspect", "-f", "{{json .NetworkSettings.Networks}}", cid]).stdout
        nets = [n for n in json.loads(out) if n.startswith(self.project.replace("-", ""))
                or n.startswith(self.project)]
        if not nets:
            raise Failure(f"{self.name(cid)} is on no network of {self.project}: {out}")
        return nets[0]

    def print_logs(self):
        print("=" * 30 + f" logs of every container of {self.project} " + "=" * 30, flush=True)
        ids = sh(self.compose + ["ps", "-a", "-q"], check=False).stdout.split()
        for cid in ids:
            name = sh(["docker", "inspect", "-f", "{{.Name}}", cid], check=False).stdout.strip()
            state = sh(["docker", "inspect", "-f", "{{.State.Status}} exit={{.State.ExitCode}}",
                        cid], check=False).stdout.strip()
            print(f"----- {name} ({state}) -----", flush=True)
            subprocess.run(["docker", "logs", "--timestamps", cid], stderr=subprocess.STDOUT)
        sys.stdout.flush()

    def log_lines(self, cid, needle):
        """The lines of the container's log (all its runs) that contain needle."""
        r = subprocess.run(["docker", "logs", cid], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, errors="replace", timeout=60)
        plain = re.sub(r"\x1b\[[0-9;]*m", "", r.stdout)  # colour codes, should any be there
        return [line for line in plain.splitlines() if needle in line]

    def stop(self, cid):
        """SIGTERM (docker stop): the node must write a final checkpoint and exit 0. Returns the
        round of that checkpoint."""
        before = len(self.log_lines(cid, "final checkpoint written"))
        sh(["docker", "stop", "-t", "30", cid], timeout=60)
        code = sh(["docker", "inspect", "-f", "{{.State.ExitCode}}", cid]).stdout.strip()
        if code != "0":
            raise Failure(f"{self.name(cid)} exited {code} on SIGTERM (expected 0)")
        lines = self.log_lines(cid, "final checkpoint written")
        if len(lines) != before + 1:
            raise Failure(f"{self.name(cid)} exited 0 on SIGTERM but logged no 'final checkpoint "
                          f"written' for this stop")
        m = re.search(r"round=(\d+)", lines[-1].split("final checkpoint written", 1)[1])
        if not m:
            raise Failure(f"no round in {lines[-1]!r}")
        return int(m.group(1))

    def down(self):
        self.stop_poll.set()
        if self.poller:
            self.poller.join(timeout=10)
        if os.environ.get("KEEP") == "1":
            log(f"KEEP=1: leaving project {self.project} running")
            return
        subprocess.run(self.compose + ["down", "-v", "--remove-orphans", "-t", "10"],
                       capture_output=True, text=True, timeout=180)

    # -- status ----------------------------------------------------------------------------------
    def status(self, cid):
        port = self.ports.get(cid)
        if port is None:
            r = sh(["docker", "port", cid, "8080/tcp"], check=False, timeout=20)
            line = r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else ""
            if line.startswith("127.0.0.1:"):
                port = int(line.rsplit(":", 1)[1])
                self.ports[cid] = port
        if port is not None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=2) as resp:
                    return json.loads(resp.read())
            except (OSError, ValueError):
                self.ports.pop(cid, None)
        try:
            r = subprocess.run(["docker", "exec", cid, "diloco-node", "health", "--timeout", "2"],
                               capture_output=True, text=True, timeout=15)
        except subprocess.TimeoutExpired:
            return None
        if r.returncode != 0:
            return None
        try:
            return json.loads(r.stdout)
        except ValueError:
            return None

    def poll_once(self, cids):
        for cid in cids:
            st = self.status(cid)
            if st is None:
                continue
            now = time.time()
            with self.lock:
                self.latest[cid] = st
                self.obs.setdefault(cid, []).append((now, st["round"], st["global_hash"]))
                top = max(self.progress[-1][1] if self.progress else -1, st["round"])
                if not self.progress or top > self.progress[-1][1]:
                    self.progress.append((now, top))

    def start_poller(self, cids, interval=0.3):
        def loop():
            while not self.stop_poll.is_set():
                try:
                    self.poll_once(cids)
                except Exception as e:  # keep polling; the waits report what is missing
                    log(f"poller: {e}")
                self.stop_poll.wait(interval)
        self.poller = threading.Thread(target=loop, daemon=True)
        self.poller.start()

    def top_round(self, cids):
        with self.lock:
            return max((self.latest[c]["round"] for c in cids if c in self.latest), default=-1)

    def wait(self, what, cond, timeout, every=0.3):
        deadline = time.time() + timeout
        while time.time() < deadline:
            v = cond()
            if v:
                return v
            time.sleep(every)
        raise Failure(f"timed out after {timeout:.0f} s waiting for {what}; {self.summary()}")

    def summary(self):
        with self.lock:
            parts = []
            for cid, st in sorted(self.latest.items(), key=lambda kv: self.name(kv[0])):
                parts.append(f"{self.name(cid)}: phase={st['phase']} round={st['round']} "
                             f"hash={st['global_hash'][:12]} member={st['member']} "
                             f"group={st['group_size']} "
                             f"peers={st['connected_peers']}")
            return "latest status: " + "; ".join(parts)

    def wait_answering(self, cids, timeout=90):
        self.wait(f"/status of {[self.name(c) for c in cids]}",
                  lambda: all(self.status(c) is not None for c in cids), timeout)

    def wait_agree(self, cids, min_round, timeout, since=None):
        """Waits until every node in cids reported the same global_hash at one round >= min_round
        (observations after `since`). Nodes advance fast, so rounds are matched from the
        observation history rather than from one simultaneous snapshot."""
        since = since or 0.0

        def agreed():
            with self.lock:
                per = []
                for c in cids:
                    m = {}
                    for t, r, h in self.obs.get(c, []):
                        if t >= since and r >= min_round:
                            m[r] = h
                    per.append(m)
            common = set(per[0]).intersection(*per[1:]) if per else set()
            for r in sorted(common, reverse=True):
                hashes = {m[r] for m in per}
                if len(hashes) == 1:
                    return (r, hashes.pop())
            return None

        r, h = self.wait(f"{[self.name(c) for c in cids]} to agree at a round >= {min_round}",
                         agreed, timeout)
        log(f"agree: {len(cids)} nodes at round {r}, global_hash {h[:16]}")
        return r, h

    def wait_members(self, cids, timeout):
        """Waits until every node in cids is a member of a group of len(cids) and caught up
        (same round and global_hash as the others): the steady state. A restarted node reports
        member=True as soon as it restores its checkpoint, while it is still replaying rounds;
        until it has caught up it cannot vote, so it still counts as failed, and a 3-node
        network tolerates one failure at a time."""
        def members():
            sts = [self.status(c) for c in cids]
            if not all(st and st["member"] and st["group_size"] == len(cids) for st in sts):
                return False
            return len({(st["round"], st["global_hash"]) for st in sts}) == 1

        self.wait(f"{[self.name(c) for c in cids]} to be members of one group of {len(cids)}",
                  members, timeout, every=0.5)
        log(f"members: all {len(cids)} nodes are caught-up members of the group")

    def wait_rounds(self, cids, n, timeout):
        """Waits until the nodes in cids have all advanced n rounds past the current top round."""
        start = self.top_round(cids)
        target = start + n

        def done():
            with self.lock:
                return all(c in self.latest and self.latest[c]["round"] >= target for c in cids)

        self.wait(f"{[self.name(c) for c in cids]} to reach round {target}", done, timeout)
        log(f"progress: {[self.name(c) for c in cids]} went from round {start} to >= {target}")

    def wait_phase(self, cid, phase, timeout):
        def check():
            st = self.status(cid) or {}
            return st if st.get("phase") == phase else None
        return self.wait(f"{self.name(cid)} in phase {phase}", check, timeout, every=0.1)

    def max_gap(self, since, until=None):
        """Longest time between consecutive increases of the top round in [since, until]."""
        until = until or time.time()
        with self.lock:
            times = [t for t, _ in self.progress if since <= t <= until]
        times = [since] + times + [until]
        return max(b - a for a, b in zip(times, times[1:]))


def timeouts():
    c = RUN_CONFIG
    return (c["straggler_timeout_ms"] + c["agg_timeout_ms"] + c["attempt_timeout_ms"]) / 1000.0


def check_loss_falls(net, cids, timeout=120):
    """Eval loss of the global parameters (the same on every node, so the nodes' eval_history
    entries are merged: a node that joined late only has the recent ones) must fall."""
    def history():
        merged = {}
        for c in cids:
            for r, loss in (net.status(c) or {}).get("eval_history", []):
                merged[r] = loss
        return sorted(merged.items()) if len(merged) >= 3 else None

    hist = net.wait("an eval history of >= 3 rounds", history, timeout, every=1.0)
    (r0, first), (r1, last) = hist[0], hist[-1]
    log(f"loss: eval loss {first:.3f} at round {r0} -> {last:.3f} at round {r1}")
    if not last < first:
        raise Failure(f"eval loss did not fall: {hist}")


def run_test(net):
    t0 = time.time()
    net.up(3)
    cids = net.nodes()
    if len(cids) != 3:
        raise Failure(f"expected 3 node containers, got {len(cids)}")
    net.wait_answering(cids, timeout=60)
    log(f"all 3 nodes answer /status {time.time() - t0:.1f} s after `up`")
    net.start_poller(cids)

    # 1. Convergence: >= 3 rounds, one global_hash, falling loss.
    net.wait_agree(cids, 3, timeout=240)
    check_loss_falls(net, cids)
    net.wait_members(cids, timeout=120)
    check_bootstrap_dashboard(net, len(cids))

    # 2. SIGKILL one node mid-round (while it trains); the others keep completing rounds.
    victim = cids[1]
    others = [c for c in cids if c != victim]
    peer_id = net.status(victim)["peer_id"]
    rnd = net.wait_phase(victim, "training", timeout=60)["round"]
    sh(["docker", "kill", victim])
    log(f"killed {net.name(victim)} (SIGKILL) while training round {rnd}")
    with net.lock:
        net.latest.pop(victim, None)
    net.wait_rounds(others, 3, timeout=120)
    net.wait_agree(others, net.top_round(others), timeout=60)

    # 3. Start it again: same identity (key in its checkpoint volume), resyncs and matches.
    sh(["docker", "start", victim])
    since = time.time()
    net.wait_answering([victim], timeout=60)
    log(f"{net.name(victim)} answered /status {time.time() - since:.1f} s after `docker start`")
    back = net.status(victim)["peer_id"]
    if back != peer_id:
        raise Failure(f"restarted node changed identity: {peer_id} -> {back}")
    log(f"restarted {net.name(victim)} (same peer id); waiting for it to resync")
    net.wait_agree(cids, net.top_round(others) + 1, timeout=180, since=since)
    # Back in the group before the partition: with it still joining, cutting one of the two
    # members off leaves no quorum (2 of 2), and no round can admit the joiner.
    net.wait_members(cids, timeout=120)

    # 4. Partition: disconnect one node from the network, then reconnect it.
    cut = cids[2]
    rest = [c for c in cids if c != cut]
    netname = net.network(cut)
    sh(["docker", "network", "disconnect", netname, cut])
    log(f"disconnected {net.name(cut)} from {netname}")
    net.wait_rounds(rest, 3, timeout=120)
    net.wait_agree(rest, net.top_round(rest), timeout=60)
    sh(["docker", "network", "connect", "--alias", "node", netname, cut])
    since = time.time()
    log(f"reconnected {net.name(cut)}; waiting for it to recover")
    net.wait_agree(cids, net.top_round(rest) + 1, timeout=180, since=since)
    check_loss_falls(net, cids)

    # 5. SIGTERM: every node saves a checkpoint and exits 0; a node started again restores that
    # checkpoint (it is alone now, so it waits for peers: restoring is what is checked).
    saved = {c: net.stop(c) for c in cids}
    log(f"SIGTERM: all 3 nodes wrote a final checkpoint (rounds {sorted(saved.values())}) and "
        f"exited 0")
    first = cids[0]
    restored_before = len(net.log_lines(first, "restored from checkpoint"))
    t_start = time.time()
    sh(["docker", "start", first])
    net.wait_answering([first], timeout=60)
    answered = time.time() - t_start

    def restored():
        lines = net.log_lines(first, "restored from checkpoint")
        return lines[restored_before:] or None

    line = net.wait(f"{net.name(first)} to restore its checkpoint", restored, 60, every=0.5)[0]
    m = re.search(r"round=(\d+)", line.split("restored from checkpoint", 1)[1])
    if not m or int(m.group(1)) != saved[first]:
        raise Failure(f"{net.name(first)} restored {line!r}, expected round {saved[first]}")
    log(f"restart: {net.name(first)} answered /status {answered:.1f} s after `docker start` and "
        f"restored the round-{saved[first]} checkpoint its SIGTERM wrote")
    top = max(r for o in net.obs.values() for _, r, _ in o)
    log(f"compose test passed: {top} rounds in {time.time() - t0:.0f} s")


def run_chaos(net, duration, period=15.0, nodes=3):
    seed = int(os.environ.get("CHAOS_SEED", random.randrange(1 << 30)))
    # Diagnostic knob: kill only while the victim is in this /status phase (e.g. "training").
    phase = os.environ.get("CHAOS_KILL_PHASE", "")
    rng = random.Random(seed)
    log(f"chaos: {nodes} nodes, kill+restart a random node every {period:.0f} s for "
        f"{duration:.0f} s (CHAOS_SEED={seed}{', CHAOS_KILL_PHASE=' + phase if phase else ''})")
    t0 = time.time()
    net.up(nodes)
    cids = net.nodes()
    net.wait_answering(cids, timeout=60)
    net.start_poller(cids)
    net.wait_agree(cids, 2, timeout=240)
    # Chaos starts on a formed network: every node a member of the group, not still joining.
    net.wait_members(cids, timeout=120)

    # A round that loses a member mid-way ends at the latest after the straggler, aggregation and
    # attempt timeouts; the next one then has to train and average (one more attempt timeout is
    # a generous bound for that), so a longer time without a new round means a round stalled
    # past its timeouts.
    limit = timeouts() + RUN_CONFIG["attempt_timeout_ms"] / 1000.0
    start = time.time()
    start_round = net.top_round(cids)
    kills = 0
    last_rnd = None
    next_tick = start
    while time.time() < start + duration:
        gap = net.max_gap(start)
        if gap > limit:
            raise Failure(f"no new round for {gap:.1f} s (limit {limit:.1f} s); {net.summary()}")
        # Next kill on the 15 s grid (waiting here only paces the schedule, not a check).
        time.sleep(max(0.0, next_tick - time.time()))
        # One failure at a time: the last victim must be back in the group first (with two of
        # three down a majority quorum is gone by design). Rejoining is bounded too.
        net.wait_members(cids, timeout=90)
        # ... and the group must have finished a round since the last kill: membership alone
        # came back within seconds once, and a second kill 3 s after the first (both in round
        # 29) stacked two failures' timeouts into one stall window, past the one-failure limit.
        if last_rnd is not None:
            net.wait_agree(cids, last_rnd + 1, timeout=90)
        next_tick = max(next_tick + period, time.time())
        victim = rng.choice(cids)
        sig = rng.choice(["KILL", "KILL", "TERM"])
        if phase:
            rnd = net.wait_phase(victim, phase, timeout=60)["round"]
        else:
            rnd = (net.status(victim) or {}).get("round")
        if sig == "KILL":
            sh(["docker", "kill", victim])
        else:
            net.stop(victim)
        kills += 1
        last_rnd = rnd if isinstance(rnd, int) else net.top_round(cids)
        with net.lock:
            net.latest.pop(victim, None)
        down = rng.uniform(0.5, 5.0)
        log(f"chaos: SIG{sig} {net.name(victim)} at round {rnd}; restarting in {down:.1f} s")
        time.sleep(down)
        sh(["docker", "start", victim])
    end = time.time()
    end_round = net.top_round(cids)

    for c in cids:
        if not net.running(c):
            sh(["docker", "start", c])
    net.wait_answering(cids, timeout=60)
    r, _ = net.wait_agree(cids, end_round + 1, timeout=240, since=end)
    gap = net.max_gap(start, end)
    rounds = end_round - start_round
    log(f"chaos: {kills} kills in {end - start:.0f} s; rounds {start_round} -> {end_round} "
        f"({rounds} rounds, {(end - start) / max(rounds, 1):.2f} s/round); longest time without "
        f"a new round {gap:.1f} s (limit {limit:.1f} s); all {len(cids)} nodes agree at round {r}")
    if rounds < duration / limit:
        raise Failure(f"only {rounds} rounds in {duration:.0f} s")
    if gap > limit:
        raise Failure(f"a round stalled for {gap:.1f} s (limit {limit:.1f} s)")
    log(f"chaos test passed in {time.time() - t0:.0f} s")


def main():
    if len(sys.argv) < 2 or sys.argv[1] not in ("test", "chaos"):
        print(__doc__)
        return 2
    kind = sys.argv[1]
    net = Testnet(kind)

    def on_signal(signum, _frame):
        raise Failure(f"interrupted by signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    ok = False
    try:
        if kind == "test":
            run_test(net)
        else:
            duration = float(sys.argv[2]) if len(sys.argv) > 2 else 180.0
            run_chaos(net, duration)
        ok = True
    except (Failure, subprocess.TimeoutExpired) as e:
        log(f"FAILED: {e}")
        net.print_logs()
    finally:
        net.down()
    print(f"{kind}: {'1 passed, 0 failed' if ok else '0 passed, 1 failed'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
