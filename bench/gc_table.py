#!/usr/bin/env python3
"""Summarises group_commit lines (examples/group_commit.rs) as a Markdown table: medians and
ranges per other writer and strategy. usage: gc_table.py FILE..."""
import collections
import statistics
import sys

rows = collections.defaultdict(list)
for path in sys.argv[1:]:
    for line in open(path):
        if not line.startswith("group_commit "):
            continue
        kv = dict(x.split("=", 1) for x in line.split()[1:])
        other = kv["other"]
        rows[(other, kv["strategy"])].append(kv)

order = ["fsync", "parallel", "syncfs", "adaptive"]
print("| other writer | strategy | files/s (median [min-max]) | commit p50 ms | commit max ms (median [min-max]) | other writer's rate |")
print("|---|---|---|---|---|---|")
for other in ["none", "burst", "fsyncer"]:
    for s in order:
        v = rows.get((other, s), [])
        if not v:
            continue
        def col(k):
            return [float(x[k]) for x in v]
        r, p50, mx = col("files_per_s"), col("commit_p50_ms"), col("commit_max_ms")
        rates = sorted({x.get("other_rate", "-") for x in v})
        print(f"| {other} | {s} | {statistics.median(r):.0f} [{min(r):.0f}-{max(r):.0f}] | "
              f"{statistics.median(p50):.2f} | {statistics.median(mx):.1f} [{min(mx):.1f}-{max(mx):.1f}] | "
              f"{', '.join(rates)} |")
