#!/usr/bin/env python3
"""Summarises recipe-study results (JSON lines written by run_grid.sh) as a markdown table:
one row per configuration (the grid line without its --seed), mean ± sample std of the final
eval loss over seeds, the seeds' values, and the change against the DP row of the same
implementation, initialisation and step count.

    python3 bench/recipe/report.py bench/recipe/*.jsonl
"""

import json
import re
import statistics
import sys
from collections import OrderedDict


def key_of(grid):
    return re.sub(r"\s*--seed \d+", "", grid).strip()


def dp_key(grid):
    k = key_of(grid)
    k = re.sub(r"--mode diloco", "--mode dp", k)
    k = re.sub(r"\s*--replicas \d+", "", k)
    k = re.sub(r"\s*--inner-steps \d+", "", k)
    k = re.sub(r"\s*--outer-lr [0-9.]+", "", k)
    k = re.sub(r"\s*--outer-momentum [0-9.]+", "", k)
    return k


def main():
    rows = OrderedDict()
    for path in sys.argv[1:]:
        for line in open(path):
            if line.strip():
                r = json.loads(line)
                rows.setdefault(key_of(r["grid"]), []).append(r)
    means = {}
    for k, rs in rows.items():
        means[dp_key(k) if "--mode dp" in k else k] = statistics.mean(r["eval_loss"] for r in rs)
    print("| configuration | seeds | eval loss (mean ± std) | per seed | vs DP |")
    print("|---|---|---|---|---|")
    for k, rs in rows.items():
        vals = [r["eval_loss"] for r in sorted(rs, key=lambda r: r["seed"])]
        mean = statistics.mean(vals)
        std = statistics.stdev(vals) if len(vals) > 1 else float("nan")
        ref = means.get(dp_key(k)) if "--mode dp" not in k else None
        vs = f"{100 * (mean / ref - 1):+.1f} %" if ref else ""
        spread = f"{mean:.4f} ± {std:.4f}" if len(vals) > 1 else f"{mean:.4f}"
        print(f"| `{k}` | {len(vals)} | {spread} | {', '.join(f'{v:.4f}' for v in vals)} | {vs} |")


if __name__ == "__main__":
    main()
