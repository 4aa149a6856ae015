#!/usr/bin/env python3
"""Does the network path train like the simulator? Runs a 2-node `diloco-node join` run on
loopback (a diloco-bootstrap and two nodes founding the run together with --founders 2) and
`diloco-node simulate --replicas 2` at equal settings (each peer's batch = half the simulator's
global batch, same H, outer step, codec, schedule and seed), then prints the eval loss of the
global parameters after every round side by side, and one JSON line with the largest gap.

Usage: python3 bench/join_vs_simulate.py [--rounds 10] [--inner-steps 20] [--data FILE]
           [--model tiny] [--batch 16] [--eval-windows 256] [--keep DIR]
Binaries come from $CARGO_TARGET_DIR/release (default: the repository's target/release).
Data samples differ (join peers draw from the whole corpus keyed by their peer ids, the
simulator deals i.i.d. blocks by seed), so the curves agree within sampling noise, not bit
for bit.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EVAL = re.compile(r"round=(\d+) eval_loss=([0-9.]+).*eval of the global parameters|"
                  r"eval of the global parameters.*round=(\d+) eval_loss=([0-9.]+)")


def main():
    here = Path(__file__).resolve().parent.parent
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--inner-steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16, help="sequences per peer per step")
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--data", default=str(here.parent / "shared" / "data" / "shakespeare.txt"))
    ap.add_argument("--eval-windows", type=int, default=256)
    ap.add_argument("--outer-lr", type=float, default=None, help="default: the run config default")
    ap.add_argument("--keep", default=None)
    a = ap.parse_args()
    bindir = Path(os.environ.get("CARGO_TARGET_DIR", Path(__file__).resolve().parent.parent / "target")) / "release"
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="join-vs-sim-"))
    work.mkdir(parents=True, exist_ok=True)
    rc = {"model": a.model, "inner_steps": a.inner_steps, "rounds": a.rounds, "batch": a.batch,
          "seq": 128, "quantize": "int8", "seed": 0}
    if a.outer_lr is not None:
        rc["outer_lr"] = a.outer_lr
    (work / "run.json").write_text(json.dumps(rc))
    procs = []
    t0 = time.time()
    try:
        boot = subprocess.Popen(
            [str(bindir / "diloco-bootstrap"), "--listen", "/ip4/127.0.0.1/tcp/0", "--key", str(work / "boot.key")],
            stdout=subprocess.PIPE, stderr=open(work / "boot.log", "w"), text=True)
        procs.append(boot)
        addr = boot.stdout.readline().strip()
        nodes = []
        for i in range(2):
            p = subprocess.Popen(
                [str(bindir / "diloco-node"), "join", "--bootstrap", addr, "--listen", "/ip4/127.0.0.1/tcp/0",
                 "--run-config", str(work / "run.json"), "--data", a.data, "--backend", "cpu",
                 "--eval-windows", str(a.eval_windows), "--checkpoint-every", "0", "--founders", "2",
                 "--genesis-wait", "3", "--json"],
                stdout=open(work / f"node{i}.out", "w"), stderr=open(work / f"node{i}.log", "w"),
                env={**os.environ, "RAYON_NUM_THREADS": "1", "NO_COLOR": "1"})
            procs.append(p)
            nodes.append(p)
        sim = subprocess.run(
            [str(bindir / "diloco-node"), "simulate", "--data", a.data, "--model", a.model, "--replicas", "2",
             "--batch", str(2 * a.batch), "--steps", str(a.rounds * a.inner_steps), "--inner-steps",
             str(a.inner_steps), "--quantize", "int8", "--eval-every", str(a.inner_steps), "--eval-windows",
             str(a.eval_windows), "--backend", "cpu", "--json"]
            + (["--outer-lr", str(a.outer_lr)] if a.outer_lr is not None else []),
            capture_output=True, text=True, env={**os.environ, "RAYON_NUM_THREADS": "1"})
        if sim.returncode != 0:
            sys.exit(f"simulate failed:\n{sim.stderr[-3000:]}")
        for p in nodes:
            p.wait(timeout=3600)
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
    sim_hist = [h["eval_loss"] for h in json.loads(sim.stdout.strip().splitlines()[-1])["eval_history"]]
    joined = []
    for i in range(2):
        per_round = {}
        for line in open(work / f"node{i}.log"):
            m = EVAL.search(line)
            if m:
                r, loss = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
                per_round[int(r)] = float(loss)
        joined.append([per_round[r] for r in sorted(per_round)])
    n = min(len(sim_hist), *(len(j) for j in joined))
    if n == 0:
        sys.exit(f"no eval lines found (logs in {work})")
    print(f"{'round':>5} {'join node 0':>12} {'join node 1':>12} {'simulate':>10} {'gap':>8}")
    worst = 0.0
    for r in range(n):
        gap = joined[0][r] - sim_hist[r]
        worst = max(worst, abs(gap) / sim_hist[r])
        print(f"{r + 1:>5} {joined[0][r]:>12.4f} {joined[1][r]:>12.4f} {sim_hist[r]:>10.4f} {gap:>+8.4f}")
    print(json.dumps({"rounds": n, "join": joined[0], "simulate": sim_hist,
                      "max_rel_gap": worst, "wall_s": time.time() - t0, "logs": str(work)}))


if __name__ == "__main__":
    main()
