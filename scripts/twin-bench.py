#!/usr/bin/env python3
"""zoo against PyTorch twins on the GPU machine (issue 11): the same softmax LM, the same shapes,
one command, one JSON.

Models (zoo's configs/bench-baseline.toml, and a 6-layer d=384 variant): RMSNorm pre-norm blocks,
softmax attention with RoPE (theta 10000, head dim 64), SwiGLU of width ceil8(8d/3), tied
embeddings, vocab 32768. Implementations:
- zoo: `zoo bench` (fused kernels; and ZOO_KERNELS=naive, the compositions), bf16 activations on
  f32 master weights;
- hf: transformers' LlamaForCausalLM, attn_implementation="sdpa";
- eager: a hand-written twin (F.scaled_dot_product_attention, plain PyTorch ops);
- compile: the same twin under torch.compile.
Twins run in f32 weights under bf16 autocast (zoo's precision). Train step = forward +
cross-entropy + backward + clip(1.0) + AdamW (fused=False, foreach) on random tokens; prefill =
forward over B x T without grad; decode (hf only) = `generate` with its KV cache, greedy, after a
prefill of T tokens. Medians of ITERS after WARMUP, synchronised; peak = torch.cuda.max_memory_allocated
of the phase.

    python3 scripts/twin-bench.py --zoo .devbin/zoo --out $OUT/twins-h200.json
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
VOCAB = 32768
# (name, layers, d_model, heads, [(T, B), ...]) as issue 11's table.
MODELS = [("6L-384", 6, 384, 6, [(256, 32)]), ("8L-512", 8, 512, 8, [(1024, 4), (4096, 4)])]


def hidden(d):
    return (8 * d // 3 + 7) // 8 * 8


class Block(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.h = h
        self.n1, self.n2 = nn.RMSNorm(d, eps=1e-5), nn.RMSNorm(d, eps=1e-5)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        self.w13 = nn.Linear(d, 2 * hidden(d), bias=False)
        self.w2 = nn.Linear(hidden(d), d, bias=False)

    def forward(self, x, cos, sin):
        b, t, d = x.shape
        q, k, v = self.qkv(self.n1(x)).view(b, t, 3, self.h, d // self.h).transpose(1, 3).unbind(2)

        def rope(z):
            z1, z2 = z.chunk(2, -1)
            return torch.cat([z1 * cos - z2 * sin, z2 * cos + z1 * sin], -1)

        a = F.scaled_dot_product_attention(rope(q), rope(k), v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        g, u = self.w13(self.n2(x)).chunk(2, -1)
        return x + self.w2(F.silu(g) * u)


class Twin(nn.Module):
    def __init__(self, layers, d, h):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, d)
        self.blocks = nn.ModuleList(Block(d, h) for _ in range(layers))
        self.norm = nn.RMSNorm(d, eps=1e-5)
        hd = d // h
        inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
        ang = torch.arange(8192).float()[:, None] * inv[None]
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)

    def forward(self, ids):
        t = ids.shape[1]
        x = self.emb(ids)
        cos, sin = self.cos[:t].to(x.dtype), self.sin[:t].to(x.dtype)
        for blk in self.blocks:
            x = blk(x, cos, sin)
        return self.norm(x) @ self.emb.weight.t()


def hf_model(layers, d, h):
    from transformers import LlamaConfig, LlamaForCausalLM
    c = LlamaConfig(vocab_size=VOCAB, hidden_size=d, intermediate_size=hidden(d), num_hidden_layers=layers,
                    num_attention_heads=h, num_key_value_heads=h, rms_norm_eps=1e-5, rope_theta=10000.0,
                    tie_word_embeddings=True, max_position_embeddings=8192, attn_implementation="sdpa")
    return LlamaForCausalLM(c)


def timed(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    ts = []
    for _ in range(iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), torch.cuda.max_memory_allocated()


def bench_twin(kind, layers, d, h, t, b, a):
    torch.manual_seed(0)
    model = (hf_model(layers, d, h) if kind == "hf" else Twin(layers, d, h)).cuda()
    fwd = (lambda ids: model(ids).logits) if kind == "hf" else model
    if kind == "compile":
        fwd = torch.compile(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=False)
    ids = torch.randint(0, VOCAB, (b, t + 1), device="cuda")
    row = {"impl": kind, "seq_len": t, "batch": b}

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = fwd(ids[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    try:
        s, peak = timed(step, a.warmup, a.iters)
        row.update(train_step_s=s, train_tokens_per_s=b * t / s, train_peak_bytes=peak)
    except torch.OutOfMemoryError as e:
        row["train_error"] = f"out of memory: {str(e).splitlines()[0]}"
    opt = None
    torch.cuda.empty_cache()

    def prefill():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            fwd(ids[:, :-1])

    try:
        s, peak = timed(prefill, a.warmup, a.iters)
        row.update(prefill_s=s, prefill_tokens_per_s=b * t / s, prefill_peak_bytes=peak)
    except torch.OutOfMemoryError as e:
        row["prefill_error"] = f"out of memory: {str(e).splitlines()[0]}"
    if kind == "hf":
        model = model.to(torch.bfloat16)

        def decode():
            with torch.no_grad():
                model.generate(ids[:, :-1], max_new_tokens=a.decode_tokens, min_new_tokens=a.decode_tokens, do_sample=False)

        try:
            s_all, peak = timed(decode, 1, max(1, a.iters // 2))
            s_pre, _ = timed(prefill, 1, max(1, a.iters // 2))
            row.update(decode_tokens_per_s=b * (a.decode_tokens - 1) / max(s_all - s_pre, 1e-9), decode_peak_bytes=peak)
        except torch.OutOfMemoryError as e:
            row["decode_error"] = f"out of memory: {str(e).splitlines()[0]}"
    del model, fwd
    torch.cuda.empty_cache()
    print(json.dumps(row), flush=True)
    return row


def bench_zoo(layers, d, h, shapes, a, kernels):
    base = open(os.path.join(ROOT, "configs", "bench-baseline.toml")).read()
    cfg = base.replace("d_model = 512", f"d_model = {d}").replace("n_layers = 8", f"n_layers = {layers}") \
              .replace("n_heads = 8", f"n_heads = {h}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.toml")
        open(path, "w").write(cfg)
        for t, b in shapes:
            out = os.path.join(tmp, f"{t}-{b}.json")
            env = dict(os.environ, ZOO_KERNELS=kernels)
            r = subprocess.run([a.zoo, "bench", path, "--device", "cuda:0", "--dtype", "bf16", "--seq-lens", str(t),
                                "--batch", str(b), "--warmup", str(a.warmup), "--iters", str(a.iters),
                                "--decode-tokens", str(a.decode_tokens), "--out", out, "-q"],
                               env=env, capture_output=True, text=True)
            if r.returncode != 0:
                rows.append({"impl": f"zoo-{kernels}", "seq_len": t, "batch": b, "error": r.stderr.strip()[-400:]})
                continue
            j = json.load(open(out))
            row = dict(j["rows"][0], impl=f"zoo-{kernels}")
            row["zoo_git"] = j["env"]["git"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--zoo", default=os.path.join(ROOT, ".devbin", "zoo"))
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--impls", default="zoo-fused,zoo-naive,hf,eager,compile")
    ap.add_argument("--out", default="twins-h200.json")
    a = ap.parse_args()
    impls = a.impls.split(",")
    res = {"schema": "zoo.twin-bench/1", "device": torch.cuda.get_device_name(0), "dtype": "bf16",
           "torch": torch.__version__, "protocol": __doc__.strip().split("\n\n")[1], "models": {}}
    import transformers
    res["transformers"] = transformers.__version__
    for name, layers, d, h, shapes in MODELS:
        rows = []
        for k in ("fused", "naive"):
            if f"zoo-{k}" in impls:
                rows += bench_zoo(layers, d, h, shapes, a, k)
        for kind in ("hf", "eager", "compile"):
            if kind in impls:
                rows += [bench_twin(kind, layers, d, h, t, b, a) for t, b in shapes]
        ratios = {}
        for t, b in shapes:
            by = {r["impl"]: r for r in rows if r["seq_len"] == t and r["batch"] == b}
            z = by.get("zoo-fused", {})
            for other in ("hf", "compile", "eager", "zoo-naive"):
                o = by.get(other, {})
                for m in ("train_tokens_per_s", "prefill_tokens_per_s", "decode_tokens_per_s"):
                    if m in z and m in o:
                        ratios[f"T{t}xB{b} zoo-fused/{other} {m}"] = z[m] / o[m]
                for m in ("train_peak_bytes",):
                    if m in z and m in o:
                        ratios[f"T{t}xB{b} zoo-fused/{other} {m}"] = z[m] / o[m]
        res["models"][name] = {"layers": layers, "d_model": d, "heads": h, "rows": rows, "ratios": ratios}
    tmp = a.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=1)
    os.replace(tmp, a.out)
    print(json.dumps({n: m["ratios"] for n, m in res["models"].items()}, indent=1))


if __name__ == "__main__":
    main()
