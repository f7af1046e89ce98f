#!/usr/bin/env python3
"""GPU time by kernel of one job minus another's, from two `ncu --csv --metrics
gpu__time_duration.sum` runs (e.g. an MoE LM and its dense twin, each for the same number of steps
and evaluations): prints both totals and the N kernels whose time grew the most, with their counts.
Where scripts/ncu-step-diff.py needs two step counts of one job, this needs one run of each job.

    python3 scripts/ncu-diff.py BASE.csv OTHER.csv [N]      (default 30)
"""
import importlib.util
import os
import sys

# The CSV reader (kernel name -> µs and launches) is ncu-step-diff.py's.
_spec = importlib.util.spec_from_file_location("ncu_step_diff", os.path.join(os.path.dirname(os.path.abspath(__file__)), "ncu-step-diff.py"))
_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mod)
load = _mod.load


if __name__ == "__main__":
    (tb, cb), (to, co) = load(sys.argv[1]), load(sys.argv[2])
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 30
    print(f"base:  {sum(tb.values()) / 1000:.1f} ms of GPU time in {sum(cb.values())} kernels ({sys.argv[1]})")
    print(f"other: {sum(to.values()) / 1000:.1f} ms of GPU time in {sum(co.values())} kernels ({sys.argv[2]})")
    print("other - base, ms | launches other / base | kernel")
    diff = {k: to[k] - tb.get(k, 0) for k in set(to) | set(tb)}
    for k, v in sorted(diff.items(), key=lambda x: -x[1])[:n]:
        print(f"{v / 1000:9.2f} | {co.get(k, 0):5d} / {cb.get(k, 0):5d} | {k}")
