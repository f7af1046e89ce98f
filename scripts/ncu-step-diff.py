#!/usr/bin/env python3
"""GPU time per training step by kernel, from two `ncu --csv --metrics gpu__time_duration.sum` runs
of the same job that differ only in their number of steps (S1 < S2): the difference cancels start-up
and evaluation, and dividing by S2 - S1 gives one step. Prints the kernels per step, the GPU time
per step, and the 25 kernels that take the most of it. If that GPU time is far below the step's wall
time, the step is bound by the host (launches, waits), not by the GPU.

    python3 scripts/ncu-step-diff.py ncu-S1.csv ncu-S2.csv [S2 - S1]      (default 3)
"""
import collections
import csv
import sys


def load(p):
    rows = list(csv.reader(open(p)))
    s = next(i for i, r in enumerate(rows) if "Kernel Name" in r)
    h = rows[s]; ki = h.index("Kernel Name"); vi = h.index("Metric Value"); ui = h.index("Metric Unit")
    t = collections.Counter(); c = collections.Counter()
    for r in rows[s + 1:]:
        if len(r) != len(h): continue
        v = float(r[vi].replace(",", "")); u = r[ui]
        v = v / 1000 if u in ("ns", "nsecond") else v * 1000 if u in ("ms", "msecond") else v
        name = r[ki].split("(")[0][:60]; t[name] += v; c[name] += 1
    return t, c


if __name__ == "__main__":
    steps = float(sys.argv[3]) if len(sys.argv) > 3 else 3.0
    t1, c1 = load(sys.argv[1]); t2, c2 = load(sys.argv[2])
    tot = sum(t2.values()) - sum(t1.values()); n = sum(c2.values()) - sum(c1.values())
    print(f"per step: {n / steps:.0f} kernels, {tot / steps / 1000:.2f} ms of GPU time")
    d = {k: (t2[k] - t1[k]) / steps for k in t2}
    for k, v in sorted(d.items(), key=lambda x: -x[1])[:25]:
        print(f"  {v / 1000:8.3f} ms  {(c2[k] - c1[k]) / steps:6.0f}x  {k}")
