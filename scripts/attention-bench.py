#!/usr/bin/env python3
"""Attention microbenchmark on the GPU machine (issue 11): zoo's fused kernel and composition
(`zoo bench-attention`) against PyTorch's F.scaled_dot_product_attention, same shapes, same
machine, one command; causal, bf16; forward and forward + backward (loss sum(O * W)). FLOPs as
FlashAttention-2 counts them: forward 4*B*H*T^2*d / 2 (causal), forward + backward 3.5x that.
Times are medians of ITERS runs after 2 warm-ups, each synchronised (wall clock around
synchronised calls, as `zoo bench-attention` times itself). zoo runs three times: with the default
mma.sync kernels (`fused`), with ZOO_FLASH_MMA=0 (the older WMMA kernels, `fused_wmma`) and with
ZOO_FLASH_MMA=2 (the mma.sync kernels with ldmatrix loads and unmasked interior tiles, `fused_mma2`),
and with ZOO_FLASH_CUDNN=1 (cuDNN's fused attention through zoo's op, `fused_cudnn`; its row says
in `cudnn` which cuDNN version ran, or why it did not). `sdpa_backend` records which of PyTorch's
SDPA backends were enabled and the cuDNN PyTorch loaded; `sdpa_cudnn` and `sdpa_flash` are SDPA held
to its cuDNN and its FlashAttention-2 backend.
(results/bench/attention-h200.json from build dc36ff4 predates the switch: there `fused` is WMMA
and `fused_mma` the mma.sync kernels.)

    python3 scripts/attention-bench.py --zoo .devbin/zoo --out results/bench/attention-h200.json
"""
import argparse
import json
import os
import statistics
import subprocess
import time

import torch
import torch.nn.functional as F

SHAPES = [(1, 16, 4096, 128), (4, 16, 2048, 64), (8, 8, 1024, 64)]


def sdpa_times(b, h, t, d, iters, backend=None):
    """SDPA's (forward, forward + backward) seconds; `backend` (a torch.nn.attention.SDPBackend
    name) forces that backend, so that cuDNN's own speed inside PyTorch can be told from zoo's
    plumbing around it."""
    if backend is not None:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel([getattr(SDPBackend, backend)]):
            return sdpa_times(b, h, t, d, iters)
    mk = lambda: torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    q, k, v = mk(), mk(), mk()
    w = torch.randn(b, h, t, d, device="cuda", dtype=torch.float32)

    def run(bwd):
        ts = []
        for i in range(iters + 2):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            if bwd:
                (o.float() * w).sum().backward()
            torch.cuda.synchronize()
            if i >= 2:
                ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    return run(False), run(True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--zoo", default=".devbin/zoo")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", default="attention-h200.json")
    a = ap.parse_args()
    shapes = ",".join(f"{b}:{h}:{t}:{d}" for b, h, t, d in SHAPES)
    def zoo_run(extra_env, required=True):
        z = subprocess.run([a.zoo, "bench-attention", "--device", "cuda:0", "--dtype", "bf16", "--shapes", shapes,
                            "--iters", str(a.iters)], capture_output=True, text=True, env=dict(os.environ, **extra_env))
        if z.returncode != 0:
            if required:
                raise SystemExit(f"zoo bench-attention failed: {z.stderr}")
            # An optional kernel set that fails leaves its columns out; the others are still measured.
            print(f"zoo bench-attention with {extra_env} failed: {z.stderr[-2000:]}", flush=True)
            return {"shapes": [{} for _ in SHAPES], "device": {"error": z.stderr[-2000:]}}
        return json.loads(z.stdout)
    # `fused`: the mma.sync kernels (ZOO_FLASH_CUDNN=0: cuDNN is the default in a build with it).
    zoo = zoo_run({"ZOO_FLASH_CUDNN": "0"})
    # The WMMA kernels (*_tc) and the ldmatrix mma.sync kernels (mma2) beside the default mma.sync
    # ones, in the same command.
    others = {"fused_wmma": zoo_run({"ZOO_FLASH_MMA": "0", "ZOO_FLASH_CUDNN": "0"}, False),
              "fused_mma2": zoo_run({"ZOO_FLASH_MMA": "2", "ZOO_FLASH_CUDNN": "0"}, False)}
    cudnn = zoo_run({"ZOO_FLASH_CUDNN": "1"}, False)
    others["fused_cudnn"] = cudnn
    rows = []
    for n, ((b, h, t, d), zr) in enumerate(zip(SHAPES, zoo["shapes"])):
        fwd, both = sdpa_times(b, h, t, d, a.iters)
        flops = zr["fwd_flops"]
        row = dict(zr)
        for label, z in others.items():
            if "fused" in z["shapes"][n]:
                row[label] = z["shapes"][n]["fused"]
        row["sdpa"] = {"fwd_seconds": fwd, "fwd_bwd_seconds": both,
                       "fwd_tflops": flops / fwd / 1e12, "fwd_bwd_tflops": 3.5 * flops / both / 1e12}
        # PyTorch's SDPA held to one backend: its cuDNN engine beside zoo's use of cuDNN, and
        # FlashAttention-2.
        for label, backend in (("sdpa_cudnn", "CUDNN_ATTENTION"), ("sdpa_flash", "FLASH_ATTENTION")):
            try:
                f1, b1 = sdpa_times(b, h, t, d, a.iters, backend)
                row[label] = {"fwd_seconds": f1, "fwd_bwd_seconds": b1,
                              "fwd_tflops": flops / f1 / 1e12, "fwd_bwd_tflops": 3.5 * flops / b1 / 1e12}
            except Exception as e:  # a backend this torch build or GPU lacks
                row[label] = {"error": str(e)[-500:]}
        for impl in ("fused", "fused_wmma", "fused_mma2", "fused_cudnn", "composition"):
            if row.get(impl, {}).get("fwd_seconds"):
                row[f"{impl}/sdpa"] = {"fwd": fwd / row[impl]["fwd_seconds"],
                                       "fwd_bwd": both / row[impl]["fwd_bwd_seconds"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    res = {"schema": "zoo.attention-bench/1", "device": torch.cuda.get_device_name(0), "dtype": "bf16",
           "causal": True, "iters": a.iters, "torch": torch.__version__, "zoo": {k: zoo[k] for k in ("device", "git")},
           "zoo_cudnn": cudnn["device"].get("cudnn"),
           "sdpa_backend": {"cudnn": torch.backends.cudnn.version(), "flash": torch.backends.cuda.flash_sdp_enabled(),
                            "cudnn_sdp": torch.backends.cuda.cudnn_sdp_enabled(),
                            "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled()},
           "what": "median wall seconds of synchronised calls; ratio = sdpa seconds / zoo seconds (>1: zoo faster)",
           "shapes": rows}
    tmp = a.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=1)
    os.replace(tmp, a.out)


if __name__ == "__main__":
    main()
