#!/usr/bin/env python3
"""zoo against PyTorch twins on the CPU: the GPU comparison's models (scripts/twin-bench.py: zoo's
configs/bench-baseline.toml family, RMSNorm pre-norm blocks, softmax attention with RoPE, SwiGLU,
tied embeddings, vocab 32768) at CPU sizes, one command, one JSON.

Implementations, all f32 (zoo's CPU precision), on the same threads (RAYON_NUM_THREADS for zoo,
torch.set_num_threads with the same count for PyTorch):
- zoo: `zoo bench` (default kernels: on the CPU the ops' CPU forms, here attention, RMS norm,
  RoPE, SwiGLU and the cross-entropy with the LM head fused into it, and the skinny decode matmul;
  candle's ops elsewhere); zoo-naive: the same with ZOO_KERNELS=naive (the candle compositions),
  so that the table shows the CPU forms' own gain;
- hf: transformers' LlamaForCausalLM, attn_implementation="sdpa";
- eager: twin-bench.py's hand-written twin (F.scaled_dot_product_attention, plain PyTorch ops);
- compile: the same twin under torch.compile (inductor's C++ backend).
Train step = forward + cross-entropy + backward + clip(1.0) + AdamW (foreach) on random tokens;
prefill = forward over B x T without grad; decode (zoo and hf) = greedy, one token per step with
the model's KV cache after a prefill of T tokens (zoo: `zoo bench`'s DECODE_TOKENS timed steps;
hf: `generate` of DECODE_TOKENS new tokens minus `generate` of one, B x (DECODE_TOKENS - 1)
tokens; generate's prefill computes only the last position's logits, so a plain forward is not
what it spends before its first step). Medians of ITERS timed iterations after WARMUP, then
the median over ROUNDS rounds (each implementation once per round, in turn). Memory is not
compared (PyTorch's CPU allocator has no per-phase peak); zoo's train peak (process resident
set) is recorded.

    python3 scripts/twin-bench-cpu.py --zoo target/release/zoo --rounds 2 --out results/bench/twins-cpu.json
    python3 scripts/twin-table.py results/bench/twins-cpu.json > results/bench/twins-cpu.md
"""
import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time

import torch
import torch.nn.functional as F

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
_spec = importlib.util.spec_from_file_location("twin_bench", os.path.join(ROOT, "scripts", "twin-bench.py"))
tb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tb)
VOCAB = tb.VOCAB
# (name, layers, d_model, heads, [(T, B), ...]): CPU-sized members of the same family.
MODELS = [("4L-256", 4, 256, 4, [(256, 8)]), ("6L-384", 6, 384, 6, [(256, 4)])]


def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def timed(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), ts


def bench_twin(kind, layers, d, h, t, b, a):
    torch.manual_seed(0)
    model = tb.hf_model(layers, d, h) if kind == "hf" else tb.Twin(layers, d, h)
    fwd = (lambda ids: model(ids).logits) if kind == "hf" else model
    if kind == "compile":
        fwd = torch.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, foreach=True)
    ids = torch.randint(0, VOCAB, (b, t + 1))
    row = {"impl": kind, "seq_len": t, "batch": b}

    def step():
        logits = fwd(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    s, ts = timed(step, a.warmup, a.iters)
    row.update(train_step_s=s, train_tokens_per_s=b * t / s, train_step_times=ts)

    def prefill():
        with torch.no_grad():
            fwd(ids[:, :-1])

    s, ts = timed(prefill, a.warmup, a.iters)
    row.update(prefill_s=s, prefill_tokens_per_s=b * t / s, prefill_times=ts)
    if kind == "hf" and a.decode_tokens > 1:

        def generate(n):
            with torch.no_grad():
                model.generate(ids[:, :-1], max_new_tokens=n, min_new_tokens=n, do_sample=False)

        # generate(n) − generate(1): n − 1 decoding steps, the prefill (which computes only the
        # last position's logits in generate) cancelling out.
        s_all, _ = timed(lambda: generate(a.decode_tokens), 1, max(1, a.iters // 2))
        s_one, _ = timed(lambda: generate(1), 1, max(1, a.iters // 2))
        row.update(decode_tokens_per_s=b * (a.decode_tokens - 1) / max(s_all - s_one, 1e-9))
    print(json.dumps({k: v for k, v in row.items() if not k.endswith("times")}), flush=True)
    return row


def bench_zoo(layers, d, h, shapes, a, kernels="fused"):
    rows = []
    impl = f"zoo-{kernels}"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.toml")
        open(path, "w").write(tb.zoo_config(layers, d, h))
        for t, b in shapes:
            out = os.path.join(tmp, f"{t}-{b}.json")
            r = subprocess.run([a.zoo, "bench", path, "--seq-lens", str(t), "--batch", str(b), "--warmup", str(a.warmup),
                                "--iters", str(a.iters), "--decode-tokens", str(a.decode_tokens), "--out", out, "-q"],
                               env=dict(os.environ, RAYON_NUM_THREADS=str(a.threads), ZOO_KERNELS=kernels), capture_output=True, text=True)
            if r.returncode != 0:
                rows.append({"impl": impl, "seq_len": t, "batch": b, "error": r.stderr.strip()[-400:]})
                continue
            j = json.load(open(out))
            z = j["rows"][0]
            row = {"impl": impl, "seq_len": t, "batch": b, "zoo_git": j["env"]["git"], "zoo_kernels": j["env"]["device"].get("kernels")}
            for k in ("train_step_s", "train_tokens_per_s", "prefill_s", "prefill_tokens_per_s", "train_peak_bytes", "decode_tokens_per_s"):
                if k in z:
                    row[k] = z[k]
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--zoo", default=os.path.join(ROOT, "target", "release", "zoo"))
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--decode-tokens", type=int, default=16, help="greedy tokens after the prefill (zoo and hf)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("RAYON_NUM_THREADS", os.cpu_count() or 1)))
    ap.add_argument("--rounds", type=int, default=1, help="repeat the whole comparison, alternating implementations")
    ap.add_argument("--impls", default="zoo,zoo-naive,hf,eager,compile")
    ap.add_argument("--out", default="twins-cpu.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    impls = a.impls.split(",")
    import transformers
    res = {"schema": "zoo.twin-bench/1", "device": f"{cpu_name()} ({a.threads} threads)", "dtype": "f32",
           "torch": torch.__version__, "transformers": transformers.__version__,
           "protocol": __doc__.strip().split("\n\n")[1], "rounds": a.rounds, "decode_tokens": a.decode_tokens, "models": {}, "complete": False}

    def save():
        tmp = a.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(res, f, indent=1)
        os.replace(tmp, a.out)

    metrics = ("train_step_s", "train_tokens_per_s", "prefill_s", "prefill_tokens_per_s", "train_peak_bytes", "decode_tokens_per_s")
    for name, layers, d, h, shapes in MODELS:
        raw = []
        for rnd in range(a.rounds):
            if "zoo" in impls:
                raw += [dict(r, round=rnd) for r in bench_zoo(layers, d, h, shapes, a)]
            if "zoo-naive" in impls:
                raw += [dict(r, round=rnd) for r in bench_zoo(layers, d, h, shapes, a, "naive")]
            for kind in ("hf", "eager", "compile"):
                if kind in impls:
                    raw += [dict(bench_twin(kind, layers, d, h, t, b, a), round=rnd) for t, b in shapes]
        # rows: per implementation and shape, the median over the rounds of each metric (what
        # scripts/twin-table.py reads); raw: every round's row.
        rows = []
        for impl in dict.fromkeys(r["impl"] for r in raw):
            for t, b in shapes:
                mine = [r for r in raw if r["impl"] == impl and r["seq_len"] == t and r["batch"] == b]
                row = {"impl": impl, "seq_len": t, "batch": b, "rounds": len(mine)}
                for m in metrics:
                    v = [r[m] for r in mine if m in r]
                    if v:
                        row[m] = statistics.median(v)
                for r in mine:
                    for k in ("zoo_git", "zoo_kernels", "error"):
                        if k in r:
                            row[k] = r[k]
                rows.append(row)
        ratios = {}
        for t, b in shapes:
            by = {r["impl"]: r for r in rows if r["seq_len"] == t and r["batch"] == b}
            z = by.get("zoo-fused", {})
            for other in ("hf", "eager", "compile", "zoo-naive"):
                for m in ("train_tokens_per_s", "prefill_tokens_per_s", "decode_tokens_per_s"):
                    if m in z and m in by.get(other, {}):
                        ratios[f"T{t}xB{b} zoo/{other} {m}"] = z[m] / by[other][m]
        res["models"][name] = {"layers": layers, "d_model": d, "heads": h, "rows": rows, "raw": raw, "ratios": ratios}
        save()
    res["complete"] = True
    save()
    print(json.dumps({n: m["ratios"] for n, m in res["models"].items()}, indent=1))


if __name__ == "__main__":
    main()
