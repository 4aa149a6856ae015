#!/usr/bin/env python3
"""The dashboard in a real browser: starts `diloco-node demo --nodes 3` (a bootstrap peer and
three nodes on loopback), waits until the three agree on a few rounds, loads node 1's
dashboard and the bootstrap peer's in headless Chromium, and checks the DOM the page's script
rendered: the live round, every chart drawn with points, the peer tables filled, no
JavaScript error. It saves screenshots (PNG) and prints their paths. Then it checks the
checker: the same page with JavaScript disabled must fail the same checks. Last, it stops the
demo with an interrupt, as Ctrl+C would, and checks that every process exited and every node
wrote its final checkpoint.

    python3 tests/browser/dashboard.py --bin-dir TARGET/release [--artifacts DIR]

Needs only the Python standard library and a Chromium (`chromium-headless-shell` or
`chromium`, Debian packages).
"""

import argparse
import html.parser
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

CHARTS = ["chart-loss", "chart-tps", "chart-avg", "chart-bytes", "chart-members"]


def log(msg):
    print(f"[dashboard test] {msg}", flush=True)


def fail(msg):
    log("FAIL: " + msg)
    sys.exit(1)


def get_json(url, timeout=3):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def find_browser():
    for name in ["chromium-headless-shell", "chromium", "chromium-browser"]:
        p = shutil.which(name)
        if p:
            return p
    # Debian installs the headless shell under /usr/lib.
    for p in ["/usr/lib/chromium-headless-shell/chromium-headless-shell", "/usr/lib/chromium/chromium"]:
        if os.path.exists(p):
            return p
    return None


def browser(exe, url, extra, timeout=120):
    """Runs Chromium headless on `url`; returns (stdout, stderr)."""
    profile = tempfile.mkdtemp(prefix="diloco-chromium-")
    cmd = [
        exe,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
        # Virtual time runs the page's timers (it polls every 2 s) without waiting for real
        # time; pending fetches hold it, so the DOM is what the script rendered from answers.
        "--virtual-time-budget=7000",
        "--window-size=1400,1900",
    ] + extra + [url]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    return r.stdout, r.stderr


class Dom(html.parser.HTMLParser):
    """The elements of a dumped DOM by id, with attributes and text."""

    def __init__(self):
        super().__init__()
        self.by_id = {}
        self.body = {}
        self.stack = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "body":
            self.body = a
        node = {"tag": tag, "attrs": a, "text": ""}
        if "id" in a:
            self.by_id[a["id"]] = node
        if tag not in ("meta", "link", "br", "img", "input", "line", "circle", "rect", "polyline"):
            self.stack.append(node)

    def handle_endtag(self, tag):
        while self.stack:
            n = self.stack.pop()
            if n["tag"] == tag:
                break

    def handle_data(self, data):
        for n in self.stack:
            n["text"] += data


def parse(dom_text):
    d = Dom()
    d.feed(dom_text)
    return d


def console_errors(stderr):
    """Lines where Chromium reports a page error or an uncaught exception."""
    bad = []
    for line in stderr.splitlines():
        if "CONSOLE" in line and ("Uncaught" in line or "Error" in line or ":ERROR:" in line):
            bad.append(line)
        elif "Refused to" in line:  # a Content-Security-Policy violation
            bad.append(line)
    return bad


def check_node_page(dom, stderr, round_before, round_after):
    """What is wrong with a node's rendered dashboard (empty list: nothing)."""
    problems = []
    body = dom.body
    if body.get("data-kind") != "node":
        problems.append(f"body data-kind is {body.get('data-kind')!r}, not 'node'")
    if "data-errors" in body:
        box = dom.by_id.get("errors", {}).get("text", "")
        problems.append(f"the page reported JavaScript errors: {box.strip()}")
    r = body.get("data-round")
    if r is None or not r.isdigit():
        problems.append(f"the page shows no round (body data-round={r!r})")
    else:
        r = int(r)
        if not round_before <= r <= round_after:
            problems.append(f"the page shows round {r}; the node was at {round_before}..{round_after}")
        shown = dom.by_id.get("round", {}).get("text", "").strip()
        if shown != str(r):
            problems.append(f"the round card says {shown!r}, the page's round is {r}")
    for c in CHARTS:
        pts = dom.by_id.get(c, {}).get("attrs", {}).get("data-points")
        if pts is None or not pts.isdigit() or int(pts) == 0:
            problems.append(f"chart {c} has no points (data-points={pts!r})")
    rows = dom.by_id.get("peers-node", {}).get("attrs", {}).get("data-rows")
    if rows is None or int(rows) < 2:
        problems.append(f"the peer table lists {rows!r} peers, expected the 2 others at least")
    hash_card = dom.by_id.get("hash", {}).get("text", "").strip()
    if not re.fullmatch(r"[0-9a-f]{12}", hash_card):
        problems.append(f"the global hash card shows {hash_card!r}")
    problems += [f"console: {l}" for l in console_errors(stderr)]
    return problems


def check_bootstrap_page(dom, stderr, nodes):
    problems = []
    if dom.body.get("data-kind") != "bootstrap":
        problems.append(f"body data-kind is {dom.body.get('data-kind')!r}, not 'bootstrap'")
    if "data-errors" in dom.body:
        problems.append("the page reported JavaScript errors: " + dom.by_id.get("errors", {}).get("text", ""))
    # Nodes may close an idle connection to the bootstrap peer; it still knows them.
    conns = dom.by_id.get("b-connections", {}).get("text", "").strip()
    if not conns.isdigit():
        problems.append(f"the bootstrap page shows {conns!r} connections")
    known = dom.by_id.get("b-peers", {}).get("text", "").strip()
    if not known.isdigit() or int(known) < nodes:
        problems.append(f"the bootstrap page knows {known!r} peers, expected {nodes}")
    rows = dom.by_id.get("peers-boot", {}).get("attrs", {}).get("data-rows")
    if rows is None or int(rows) < nodes:
        problems.append(f"the bootstrap peer table lists {rows!r} peers, expected {nodes}")
    pts = dom.by_id.get("chart-boot", {}).get("attrs", {}).get("data-points")
    if pts is None or int(pts) == 0:
        problems.append(f"the bootstrap chart has no points ({pts!r})")
    problems += [f"console: {l}" for l in console_errors(stderr)]
    return problems


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin-dir", required=True, help="folder with diloco-node and diloco-bootstrap")
    ap.add_argument("--artifacts", default=os.path.expanduser("~/.cache/diloco-artifacts"))
    ap.add_argument("--rounds", type=int, default=3, help="rounds the nodes agree on before loading the page")
    a = ap.parse_args()
    exe = find_browser()
    if not exe:
        fail("no Chromium found: apt-get install chromium-headless-shell")
    node_bin = os.path.join(a.bin_dir, "diloco-node")
    os.makedirs(a.artifacts, exist_ok=True)
    work = tempfile.mkdtemp(prefix="diloco-demo-test-")
    demo_log = open(os.path.join(work, "demo.log"), "w+")
    log(f"starting: diloco-node demo --nodes 3 --port 0 --dir {work}/run")
    demo = subprocess.Popen(
        [node_bin, "demo", "--nodes", "3", "--port", "0", "--dir", os.path.join(work, "run")],
        stdout=demo_log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        run(a, exe, demo, demo_log, work)
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)


def demo_text(demo_log):
    demo_log.flush()
    with open(demo_log.name) as f:
        return f.read()


def run(a, exe, demo, demo_log, work):
    start = time.time()
    urls = {}
    while len(urls) < 4:
        text = demo_text(demo_log)
        for m in re.finditer(r"node (\d) dashboard (http://\S+)", text):
            urls[int(m.group(1))] = m.group(2)
        m = re.search(r"  dashboard (http://\S+)", text)
        if m:
            urls[0] = m.group(1)
        if demo.poll() is not None:
            fail("the demo exited early:\n" + text)
        if time.time() - start > 240:
            fail("no dashboard addresses within 240 s:\n" + text)
        time.sleep(0.5)
    log(f"dashboards: {urls}")
    # Wait until the three nodes agree on --rounds decided rounds (and have an eval).
    while True:
        sts = []
        for i in (1, 2, 3):
            try:
                sts.append(get_json(urls[i] + "status"))
            except Exception:
                sts.append(None)
        if all(sts):
            rounds = {s["round"] for s in sts}
            hashes = {s["global_hash"] for s in sts}
            if len(rounds) == 1 and len(hashes) == 1 and min(rounds) >= a.rounds and all(s.get("eval_loss") for s in sts):
                log(f"3 nodes agree at round {rounds.pop()} after {time.time() - start:.0f} s (hash {hashes.pop()[:12]})")
                break
        if demo.poll() is not None:
            fail("the demo exited:\n" + demo_text(demo_log))
        if time.time() - start > 600:
            fail(f"the nodes did not agree on {a.rounds} rounds within 600 s; last: {sts}\n" + demo_text(demo_log)[-3000:])
        time.sleep(1)

    node = urls[1]
    before = get_json(node + "status")["round"]
    dom_text, err = browser(exe, node, ["--dump-dom"])
    after = get_json(node + "status")["round"]
    dom = parse(dom_text)
    problems = check_node_page(dom, err, before, after)
    shot = os.path.join(a.artifacts, "dashboard-node.png")
    browser(exe, node, [f"--screenshot={shot}"])
    log(f"screenshot of node 1's dashboard: {shot} ({os.path.getsize(shot) if os.path.exists(shot) else 0} bytes)")
    if problems:
        with open(os.path.join(a.artifacts, "dashboard-node.html"), "w") as f:
            f.write(dom_text)
        fail("node dashboard:\n  " + "\n  ".join(problems) + "\nchromium stderr:\n" + err[-3000:])
    charts = {c: dom.by_id[c]["attrs"]["data-points"] for c in CHARTS}
    log(f"node page OK: round {dom.body['data-round']} (node at {before}..{after}), chart points {charts}, "
        f"{dom.by_id['peers-node']['attrs']['data-rows']} peers listed, no console errors")

    # The checker must reject a page whose script did not run.
    dead, err2 = browser(exe, node, ["--dump-dom", "--blink-settings=scriptEnabled=false"])
    if not check_node_page(parse(dead), err2, before, get_json(node + "status")["round"]):
        fail("the checks passed on a page with JavaScript disabled: they test nothing")
    log("with JavaScript disabled the same checks fail, as they must")

    boot = urls[0]
    dom_text, err = browser(exe, boot, ["--dump-dom"])
    bdom = parse(dom_text)
    problems = check_bootstrap_page(bdom, err, 3)
    shot_b = os.path.join(a.artifacts, "dashboard-bootstrap.png")
    browser(exe, boot, [f"--screenshot={shot_b}"])
    log(f"screenshot of the bootstrap peer's dashboard: {shot_b}")
    if problems:
        fail("bootstrap dashboard:\n  " + "\n  ".join(problems) + "\n" + err[-2000:])
    log(f"bootstrap page OK: {bdom.by_id['b-connections']['text'].strip()} connections, "
        f"{bdom.by_id['peers-boot']['attrs']['data-rows']} peers listed")

    # Ctrl+C: the demo stops every process and each node writes its final checkpoint.
    t0 = time.time()
    os.kill(demo.pid, signal.SIGINT)
    try:
        demo.wait(timeout=150)
    except subprocess.TimeoutExpired:
        fail("the demo did not stop within 150 s of an interrupt:\n" + demo_text(demo_log)[-3000:])
    text = demo_text(demo_log)
    log(f"demo stopped in {time.time() - t0:.1f} s with exit status {demo.returncode}")
    if demo.returncode != 0:
        fail("the demo exited with an error:\n" + text[-3000:])
    if "killed" in text:
        fail("the demo had to kill a process:\n" + text[-3000:])
    left = subprocess.run(["pgrep", "-f", work], capture_output=True, text=True).stdout.split()
    if left:
        fail(f"processes left behind: {left}")
    for i in (1, 2, 3):
        ck = os.path.join(work, "run", f"node-{i}", "ckpt")
        latest = os.path.join(ck, "LATEST")
        if not os.path.exists(latest):
            fail(f"node {i} wrote no checkpoint in {ck}: {os.listdir(ck) if os.path.isdir(ck) else 'no folder'}")
        if os.path.getmtime(latest) < t0 - 1:
            fail(f"node {i}'s newest checkpoint predates the interrupt: no final checkpoint")
    log("every process exited; every node wrote its final checkpoint")
    shutil.rmtree(work, ignore_errors=True)
    log("PASS")


if __name__ == "__main__":
    main()
