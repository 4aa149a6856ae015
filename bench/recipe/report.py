#!/usr/bin/env python3
"""Summarises recipe-study results (JSON lines written by run_grid.sh) as a markdown table.

One row per recipe (implementation and every flag except mode, replicas and seed), one column
each for DP, DiLoCo M = 1 and M = 2: the mean final eval loss over seeds (± sample std when
there are several, seed count in brackets), and each DiLoCo column's change against the DP mean
of the same row.

    python3 bench/recipe/report.py bench/recipe/node800.jsonl bench/recipe/torch800.jsonl
"""

import json
import shlex
import statistics
import sys
from collections import OrderedDict

VARYING = {"--mode", "--replicas", "--seed"}
DIloco_ONLY = {"--inner-steps", "--outer-lr", "--outer-momentum"}


def parse(grid):
    words = shlex.split(grid)
    impl, flags = words[0], {}
    i = 1
    while i < len(words):
        k = words[i]
        v = words[i + 1] if i + 1 < len(words) and not words[i + 1].startswith("--") else ""
        flags[k] = v
        i += 2 if v else 1
    return impl, flags


def main():
    rows = OrderedDict()
    for path in sys.argv[1:]:
        for line in open(path):
            if not line.strip():
                continue
            r = json.loads(line)
            impl, flags = parse(r["grid"])
            mode = flags.get("--mode", "diloco")
            col = "DP" if mode == "dp" else f"M={flags.get('--replicas', '1')}"
            recipe = " ".join(f"{k} {v}".strip() for k, v in flags.items() if k not in VARYING)
            key = f"{impl} {recipe}"
            rows.setdefault(key, {}).setdefault(col, []).append((int(flags.get("--seed", 0)), r["eval_loss"]))
    print("| recipe | DP | DiLoCo M = 1 | vs DP | DiLoCo M = 2 | vs DP |")
    print("|---|---|---|---|---|---|")
    for key, cols in rows.items():
        def cell(c):
            if c not in cols:
                return "", None
            vals = [v for _, v in sorted(cols[c])]
            mean = statistics.mean(vals)
            if len(vals) > 1:
                return f"{mean:.4f} ± {statistics.stdev(vals):.4f} ({len(vals)})", mean
            return f"{mean:.4f} (1)", mean
        dp, dpm = cell("DP")
        out = [dp]
        for c in ("M=1", "M=2"):
            txt, m = cell(c)
            out += [txt, f"{100 * (m / dpm - 1):+.1f} %" if m is not None and dpm else ""]
        print(f"| `{key}` | " + " | ".join(out) + " |")


if __name__ == "__main__":
    main()
