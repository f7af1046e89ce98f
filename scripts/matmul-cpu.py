#!/usr/bin/env python3
"""PyTorch's CPU matmul at the shapes of crates/core/examples/matmul_cpu.rs (the CPU twins' 6L-384
model at T 256 x 4): medians of 7 after 2 warm-ups, f32, on --threads threads (default 2).
    python3 scripts/matmul-cpu.py   (with PyTorch, e.g. /work/cputwin/bin/python)"""
import argparse
import statistics
import time

import torch

SHAPES = [("qkv/o fwd", 1024, 384, 384), ("mlp up fwd", 1024, 384, 1024), ("mlp down fwd", 1024, 1024, 384),
          ("head fwd", 1024, 384, 32768), ("head dW = Pᵀ h", 32768, 1024, 384), ("mlp up dW", 384, 1024, 1024)]

ap = argparse.ArgumentParser()
ap.add_argument("--threads", type=int, default=2)
torch.set_num_threads(ap.parse_args().threads)
for name, m, k, n in SHAPES:
    a, b = torch.randn(m, k), torch.randn(k, n)
    ts = []
    for i in range(9):
        t0 = time.perf_counter()
        c = a @ b
        if i >= 2:
            ts.append(time.perf_counter() - t0)
    s = statistics.median(ts)
    print(f"{name:16} {m:6} x {k:5} x {n:6}: {s * 1e3:8.2f} ms, {2 * m * k * n / s / 1e9:6.1f} GFLOP/s")
