#!/usr/bin/env python3
"""Data-parallel scaling, zoo against PyTorch DDP on the same machine (issue 16), one JSON.

For each GPU count N in --gpus (default 1 and every power of two up to the GPUs present): zoo's
train step through `zoo --device cuda --dtype bf16 launch --gpus N bench ...` (each rank trains PER_GPU rows of the global batch N * PER_GPU, gradients all-reduced through
NCCL inside the timed step), and the hand-written twin of scripts/twin-bench.py (the 8L/512
softmax model: RMSNorm, RoPE, SDPA, SwiGLU, tied embeddings, vocab 32768) wrapped in
`torch.nn.parallel.DistributedDataParallel` under torchrun, bf16 autocast on f32 weights, AdamW,
clip 1.0, the same rows per GPU. tokens/s is global (N * PER_GPU * T per step); the scaling
column is tokens/s at N over tokens/s at 1 for the same implementation. Target (issue 16): zoo
>= 1.8x at 2 GPUs.

    python3 scripts/ddp-bench.py --zoo .devbin/zoo --out $OUT/ddp-h200x2.json
    # the DDP worker alone: torchrun --nproc_per_node 2 scripts/ddp-bench.py --worker --t 1024 --per-gpu 4
"""
import argparse
import json
import os
import subprocess
import tempfile

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def worker(a):
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    import importlib.util
    # twin-bench.py's Twin and timing (a file name with a dash: loaded by path).
    spec = importlib.util.spec_from_file_location("twin_bench", os.path.join(os.path.dirname(os.path.abspath(__file__)), "twin-bench.py"))
    tb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tb)
    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = tb.Twin(8, 512, 8).cuda()
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=False)
    g = torch.Generator(device="cuda").manual_seed(1 + rank)
    ids = torch.randint(0, tb.VOCAB, (a.per_gpu, a.t + 1), device="cuda", generator=g)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = ddp(ids[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, tb.VOCAB), ids[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    s, peak = tb.timed(step, a.warmup, a.iters)
    # The slowest rank sets the pace.
    t = torch.tensor([s], device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if rank == 0:
        print(json.dumps({"impl": "torch-ddp", "gpus": world, "seq_len": a.t, "per_gpu_batch": a.per_gpu,
                          "train_step_s": t.item(), "train_tokens_per_s": world * a.per_gpu * a.t / t.item(),
                          "train_peak_bytes": peak, "torch": torch.__version__}))
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--zoo", default=os.path.join(ROOT, ".devbin", "zoo"))
    ap.add_argument("--gpus", default="")
    ap.add_argument("--t", type=int, default=1024)
    ap.add_argument("--per-gpu", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", default="ddp-bench.json")
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    import torch
    have = torch.cuda.device_count()
    counts = [int(x) for x in a.gpus.split(",")] if a.gpus else [n for n in (1, 2, 4, 8) if n <= have]
    env = dict(os.environ, LD_LIBRARY_PATH=os.environ.get("LD_LIBRARY_PATH", "/usr/local/cuda-13.0/targets/x86_64-linux/lib"))
    # zoo opens NCCL at run time: PyTorch's nvidia-nccl wheel has the library.
    if "ZOO_NCCL_LIB" not in env:
        try:
            import nvidia.nccl
            env["ZOO_NCCL_LIB"] = os.path.join(list(nvidia.nccl.__path__)[0], "lib", "libnccl.so.2")
        except ImportError:
            pass
    rows = []
    for n in counts:
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "zoo.json")
            cmd = [a.zoo, "--device", "cuda", "--dtype", "bf16", "launch", "--gpus", str(n), "bench",
                   os.path.join(ROOT, "configs", "bench-baseline.toml"), "--seq-lens", str(a.t), "--batch", str(n * a.per_gpu),
                   "--warmup", str(a.warmup), "--iters", str(a.iters), "--decode-tokens", "0", "--out", out]
            p = subprocess.run(cmd, env=env, capture_output=True, text=True)
            row = {"impl": "zoo", "gpus": n, "seq_len": a.t, "per_gpu_batch": a.per_gpu}
            if p.returncode == 0:
                r = json.load(open(out))["rows"][0]
                row.update({k: r[k] for k in ("train_step_s", "train_tokens_per_s", "train_peak_bytes") if k in r})
                row["env"] = json.load(open(out))["env"]
            else:
                row["error"] = (p.stderr or p.stdout).strip().splitlines()[-1:]
            rows.append(row)
            print(json.dumps(row), flush=True)
        p = subprocess.run(["torchrun", "--standalone", f"--nproc_per_node={n}", os.path.abspath(__file__), "--worker",
                            "--t", str(a.t), "--per-gpu", str(a.per_gpu), "--warmup", str(a.warmup), "--iters", str(a.iters)],
                           capture_output=True, text=True)
        lines = [l for l in p.stdout.splitlines() if l.startswith("{")]
        rows.append(json.loads(lines[-1]) if lines else {"impl": "torch-ddp", "gpus": n, "error": p.stderr.strip().splitlines()[-3:]})
        print(json.dumps(rows[-1]), flush=True)
    for r in rows:
        base = next((x for x in rows if x["impl"] == r["impl"] and x["gpus"] == 1 and "train_tokens_per_s" in x), None)
        if base and "train_tokens_per_s" in r:
            r["scaling_vs_1_gpu"] = r["train_tokens_per_s"] / base["train_tokens_per_s"]
    json.dump({"schema": "zoo.ddp-bench/1", "model": "8L-512 (configs/bench-baseline.toml)", "rows": rows}, open(a.out, "w"), indent=1)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
