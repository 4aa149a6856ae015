#!/usr/bin/env python3
"""Averaging benchmark over real sockets on loopback.

Starts a diloco-bootstrap process and n `diloco-node join` processes whose run config sets
`synthetic_params`: no model is trained, every round each peer contributes a random outer
gradient of that many f32 values (all n peers found the run together with --founders n, so no
state transfer is measured) (codec `none`, so S = 4 bytes x params) after a fixed 2 s
"training" pause, and the time from a peer's READY to the round's decision is the averaging
protocol's share of the round. For each (n, payload) it reports the averaging round time and the
application bytes each peer sent and received per round, against the bandwidth-optimal
all-reduce bound 2·S·(n−1)/n.

Usage: python3 bench/averaging.py [--nodes 2,4,8] [--mb 4,32,128] [--rounds 4] [--keep DIR]
(--keep DIR keeps every process's log under DIR instead of a temporary directory.)
Binaries come from $CARGO_TARGET_DIR/release (default: the repository's target/release).
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def http_status(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.settimeout(5)
            s.sendall(b"GET /status HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            return None
        return json.loads(body)
    except (OSError, ValueError):
        return None


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_case(bindir, n, mb, rounds, workdir):
    params = mb * 1024 * 1024 // 4
    cfg = {
        "model": "tiny",
        "inner_steps": 1,
        "batch": 1,
        "seq": 8,
        "quantize": "none",
        "synthetic_params": params,
        "synthetic_train_ms": 2000,
        "straggler_timeout_ms": 60000,
        "agg_timeout_ms": 120000,
        "attempt_timeout_ms": 300000,
        "retry_ms": 2000,
    }
    case = Path(workdir) / f"n{n}-mb{mb}"
    case.mkdir(exist_ok=True)
    (case / "run.json").write_text(json.dumps(cfg))
    procs = []
    try:
        boot = subprocess.Popen(
            [str(bindir / "diloco-bootstrap"), "--listen", "/ip4/127.0.0.1/tcp/0", "--key", str(case / "boot.key")],
            stdout=subprocess.PIPE, stderr=open(case / "boot.log", "w"), text=True,
        )
        procs.append(boot)
        addr = boot.stdout.readline().strip()
        ports = []
        for i in range(n):
            port = free_port()
            ports.append(port)
            p = subprocess.Popen(
                [str(bindir / "diloco-node"), "join", "--bootstrap", addr,
                 "--listen", "/ip4/127.0.0.1/tcp/0", "--status-addr", f"127.0.0.1:{port}",
                 "--run-config", str(case / "run.json"), "--backend", "cpu",
                 "--eval-windows", "0", "--genesis-wait", "3", "--checkpoint-every", "0",
                 "--founders", str(n)],
                stdout=subprocess.DEVNULL, stderr=open(case / f"node{i}.log", "w"),
            )
            procs.append(p)
        # Wait until every node is a member of a group of n.
        deadline = time.time() + 600
        start = None
        while time.time() < deadline:
            st = [http_status(p) for p in ports]
            if all(s and s["member"] and s["group_size"] == n for s in st):
                r0 = max(s["round"] for s in st) + 1
                start = r0
                break
            time.sleep(0.2)
        if start is None:
            raise RuntimeError(f"n={n} {mb} MB: nodes never formed one group (logs in {case})")
        marks = {}
        deadline = time.time() + 1200
        while time.time() < deadline and len(marks) < 2:
            st = [http_status(p) for p in ports]
            if all(st):
                lo = min(s["round"] for s in st)
                for target in (start, start + rounds):
                    if target not in marks and lo >= target:
                        marks[target] = (time.time(), st)
            time.sleep(0.05)
        if len(marks) < 2:
            raise RuntimeError(f"n={n} {mb} MB: rounds stalled (logs in {case})")
        (t0, a), (t1, b) = marks[start], marks[start + rounds]
        sent = [(y["bytes_sent"] - x["bytes_sent"]) / rounds for x, y in zip(a, b)]
        recv = [(y["bytes_received"] - x["bytes_received"]) / rounds for x, y in zip(a, b)]
        s_bytes = params * 4
        bound = 2 * s_bytes * (n - 1) / n
        avg = [s["last_averaging_s"] for s in b if s.get("last_averaging_s") is not None]
        return {
            "nodes": n, "payload_mb": mb, "round_s": (t1 - t0) / rounds,
            "averaging_s": sum(avg) / len(avg) if avg else float("nan"),
            "sent_mean": sum(sent) / n, "sent_max": max(sent),
            "recv_mean": sum(recv) / n, "recv_max": max(recv), "bound": bound,
        }
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", default="2,4,8")
    ap.add_argument("--mb", default="4,32,128")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--keep", help="keep the logs in this directory")
    args = ap.parse_args()
    target = Path(os.environ.get("CARGO_TARGET_DIR", Path(__file__).resolve().parent.parent / "target"))
    bindir = target / "release"
    for b in ("diloco-node", "diloco-bootstrap"):
        if not (bindir / b).exists():
            sys.exit(f"{bindir / b} is missing: build with `cargo test --release --workspace --no-run`")
    print("| nodes | payload | round time (2 s of it synthetic training) | averaging time (READY to decision) | sent/peer/round (mean, max) | received/peer/round (mean, max) | bound 2S(n-1)/n | sent mean / bound |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        work = tmp
        if args.keep:
            work = args.keep
            Path(work).mkdir(parents=True, exist_ok=True)
        for n in [int(x) for x in args.nodes.split(",")]:
            for mb in [int(x) for x in args.mb.split(",")]:
                try:
                    r = run_case(bindir, n, mb, args.rounds, work)
                except RuntimeError as e:
                    print(f"| {n} | {mb} MB | failed: {e} | | | | | |", flush=True)
                    continue
                m = 1e6
                print(f"| {n} | {mb} MB | {r['round_s']:.2f} s | {r['averaging_s']:.2f} s | {r['sent_mean']/m:.1f}, {r['sent_max']/m:.1f} MB "
                      f"| {r['recv_mean']/m:.1f}, {r['recv_max']/m:.1f} MB | {r['bound']/m:.1f} MB "
                      f"| {r['sent_mean']/r['bound']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
