#!/usr/bin/env python3
"""candle's CPU matmul (zoo-core's `matmul_cpu` example) beside PyTorch's at the same shapes (the
CPU twins' 6L-384 model at T 256 x 4: 1024 rows), f32, on --threads threads, in one command:
ROUNDS rounds, each the example's medians of 7 then PyTorch's medians of 7 (after 2 warm-ups);
per shape the median over the rounds, GFLOP/s, and candle's throughput over PyTorch's, into one
JSON with the checkout's commit.
    cargo build --release -p zoo-core --example matmul_cpu
    python3 scripts/matmul-cpu.py --out results/bench/matmul-cpu.json   (with PyTorch)"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import time

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def torch_round(shapes):
    out = {}
    for s in shapes:
        a, b = torch.randn(s["m"], s["k"]), torch.randn(s["k"], s["n"])
        ts = []
        for i in range(9):
            t0 = time.perf_counter()
            a @ b
            if i >= 2:
                ts.append(time.perf_counter() - t0)
        out[s["name"]] = statistics.median(ts)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--example", default=os.path.join(ROOT, "target", "release", "examples", "matmul_cpu"))
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "bench", "matmul-cpu.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads))
    rounds = {"candle": [], "torch": []}
    shapes = None
    for r in range(a.rounds):
        lines = subprocess.run([a.example, "--json"], env=env, capture_output=True, text=True, check=True).stdout.splitlines()
        rows = [json.loads(l) for l in lines if l.startswith("{")]
        shapes = shapes or [{k: x[k] for k in ("name", "m", "k", "n")} for x in rows]
        rounds["candle"].append({x["name"]: x["seconds"] for x in rows})
        rounds["torch"].append(torch_round(shapes))
    git = lambda *c: subprocess.run(["git", *c], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    res = {"schema": "zoo.matmul-cpu/1", "device": f"{platform.processor() or platform.machine()} ({a.threads} threads), f32",
           "git": {"sha": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))},
           "torch": torch.__version__, "protocol": "per shape x (m, k) . w (k, n), random f32; medians of 7 after 2 warm-ups; "
           f"{a.rounds} rounds, each candle then PyTorch; the median over the rounds",
           "shapes": []}
    for s in shapes:
        flop = 2 * s["m"] * s["k"] * s["n"]
        c = statistics.median(r[s["name"]] for r in rounds["candle"])
        t = statistics.median(r[s["name"]] for r in rounds["torch"])
        res["shapes"].append(dict(s, candle_s=c, torch_s=t, candle_gflops=flop / c / 1e9, torch_gflops=flop / t / 1e9, candle_over_torch=t / c))
        print(f'{s["name"]:16} {s["m"]:6} x {s["k"]:5} x {s["n"]:6}: candle {flop / c / 1e9:6.1f}, torch {flop / t / 1e9:6.1f} GFLOP/s, {t / c:.2f}x')
    with open(a.out + ".tmp", "w") as f:
        json.dump(res, f, indent=1)
    os.replace(a.out + ".tmp", a.out)


if __name__ == "__main__":
    main()
