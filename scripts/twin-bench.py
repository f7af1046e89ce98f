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
prefill of T tokens; and decode alone at T = 4096, B = 1 and 32 on the 8L-512 model (issue 11's
decode target: zoo, the eager twin with a preallocated cache, HF), see bench_decode. Medians of ITERS after WARMUP, synchronised; peak = torch.cuda.max_memory_allocated
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
from torch.nn.attention import SDPBackend, sdpa_kernel

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

    def qkv_rope(self, x, cos, sin):
        b, t, d = x.shape
        q, k, v = self.qkv(self.n1(x)).view(b, t, 3, self.h, d // self.h).transpose(1, 3).unbind(2)

        def rope(z):
            z1, z2 = z.chunk(2, -1)
            return torch.cat([z1 * cos - z2 * sin, z2 * cos + z1 * sin], -1)

        return rope(q), rope(k), v

    def rest(self, x, a):
        b, t, d = x.shape
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        g, u = self.w13(self.n2(x)).chunk(2, -1)
        return x + self.w2(F.silu(g) * u)

    def forward(self, x, cos, sin):
        q, k, v = self.qkv_rope(x, cos, sin)
        return self.rest(x, F.scaled_dot_product_attention(q, k, v, is_causal=True))

    def step(self, x, cos, sin, kc, vc, pos):
        """x (B, t, d) at positions pos.., with a preallocated cache kc, vc (B, H, Tmax, hd)."""
        q, k, v = self.qkv_rope(x, cos, sin)
        t = x.shape[1]
        kc[:, :, pos:pos + t] = k
        vc[:, :, pos:pos + t] = v
        a = F.scaled_dot_product_attention(q, kc[:, :, :pos + t], vc[:, :, :pos + t], is_causal=t > 1)
        return self.rest(x, a)


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

    def step(self, ids, pos, kcs, vcs):
        """Logits of the last position of ids (B, t) at positions pos.., filling the caches."""
        t = ids.shape[1]
        x = self.emb(ids)
        cos, sin = self.cos[pos:pos + t].to(x.dtype), self.sin[pos:pos + t].to(x.dtype)
        for blk, kc, vc in zip(self.blocks, kcs, vcs):
            x = blk.step(x, cos, sin, kc, vc, pos)
        return self.norm(x[:, -1:]) @ self.emb.weight.t()


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


def zoo_config(layers, d, h):
    """configs/bench-baseline.toml at these sizes (the model the twins copy)."""
    base = open(os.path.join(ROOT, "configs", "bench-baseline.toml")).read()
    return base.replace("d_model = 512", f"d_model = {d}").replace("n_layers = 8", f"n_layers = {layers}") \
               .replace("n_heads = 8", f"n_heads = {h}")


def bench_decode(kind, layers, d, h, t, b, a):
    """Decode alone (issue 11's decode target): greedy, one token per step, after a prefill of t
    tokens, in bf16 weights. eager: the twin with a preallocated (B, H, t + n, hd) cache per layer
    written in place and SDPA (flash or memory-efficient backend, not cuDNN) over its filled part; hf: `generate` (its default dynamic cache),
    decode = (prefill + n tokens) - prefill. Peak = max_memory_allocated over the decode steps
    (weights and cache included); kv_bytes = the cache of t + n tokens in bf16."""
    torch.manual_seed(0)
    n = a.decode_tokens
    hd = d // h
    row = {"impl": kind, "seq_len": t, "batch": b, "decode_tokens": n,
           "kv_bytes": 2 * layers * b * h * (t + n) * hd * 2}
    ids = torch.randint(0, VOCAB, (b, t), device="cuda")
    try:
        if kind == "eager":
            model = Twin(layers, d, h).cuda().to(torch.bfloat16).eval()
            row["weights_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
            kcs = [torch.zeros(b, h, t + n, hd, dtype=torch.bfloat16, device="cuda") for _ in range(layers)]
            vcs = [torch.zeros_like(c) for c in kcs]
            # Flash / memory-efficient SDPA only: PyTorch picks cuDNN's attention on Hopper, which
            # builds a new cuDNN graph for every new key length (every decode step, tens of ms
            # each: the first run of this bench, dc36ff4's twins-decode-h200.json, measured 24
            # tok/s at B = 1 that way, against HF's 112).
            with torch.no_grad(), sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
                nxt = model.step(ids, 0, kcs, vcs).argmax(-1)
                for i in range(min(2, n)):  # warm-up steps (overwritten by the timed ones)
                    model.step(nxt, t + i, kcs, vcs)
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                for i in range(n):
                    nxt = model.step(nxt, t + i, kcs, vcs).argmax(-1)
                torch.cuda.synchronize()
                s = time.perf_counter() - t0
            row.update(decode_tokens_per_s=b * n / s, decode_peak_bytes=torch.cuda.max_memory_allocated())
        else:
            model = hf_model(layers, d, h).cuda().to(torch.bfloat16).eval()
            row["weights_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
            with torch.no_grad():
                gen = lambda: model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
                pre = lambda: model(ids)
                s_all, peak = timed(gen, 1, max(1, a.iters // 2))
                s_pre, _ = timed(pre, 1, max(1, a.iters // 2))
            row.update(decode_tokens_per_s=b * (n - 1) / max(s_all - s_pre, 1e-9), decode_peak_bytes=peak)
    except torch.OutOfMemoryError as e:
        row["decode_error"] = f"out of memory: {str(e).splitlines()[0]}"
    model = None
    torch.cuda.empty_cache()
    if "decode_peak_bytes" in row:
        row["peak_over_weights_kv"] = row["decode_peak_bytes"] / (row["weights_bytes"] + row["kv_bytes"])
    print(json.dumps(row), flush=True)
    return row


def bench_zoo_decode(layers, d, h, t, b, a, kernel="rows"):
    """zoo's decode at (t, b): `zoo bench --skip-train` (prefill, then greedy decode with the
    preallocated cache); weights_bytes = zoo's parameters as held (f32), kv_bytes as the twins' (bf16).
    kernel: zoo's decoding attention kernel (ZOO_FLASH_DECODE): rows (impl zoo-fused; the default
    before stop 36), split (the split-KV kernel with 8 query rows a block, ZOO_FLASH_DEC_ROWS=8, impl
    zoo-fused-split; the default in stop 36) or split-fit (split with blocks of as many query rows
    as a kv head has, impl zoo-fused-split-fit; the default since stop 37)."""
    cfg = zoo_config(layers, d, h)
    n = a.decode_tokens
    impl = "zoo-fused" if kernel == "rows" else f"zoo-fused-{kernel}"
    row = {"impl": impl, "seq_len": t, "batch": b, "decode_tokens": n, "flash_decode": kernel,
           "kv_bytes": 2 * layers * b * h * (t + n) * (d // h) * 2}
    with tempfile.TemporaryDirectory() as tmp:
        path, out = os.path.join(tmp, "model.toml"), os.path.join(tmp, "out.json")
        open(path, "w").write(cfg)
        r = subprocess.run([a.zoo, "bench", path, "--device", "cuda:0", "--dtype", "bf16", "--seq-lens", str(t),
                            "--batch", str(b), "--warmup", str(a.warmup), "--iters", str(a.iters), "--skip-train",
                            "--decode-tokens", str(n), "--out", out, "-q"], capture_output=True, text=True,
                           env=dict(os.environ, ZOO_FLASH_DECODE=kernel.split("-")[0],
                                    ZOO_FLASH_DEC_ROWS="fit" if kernel.endswith("-fit") else "8"))
        if r.returncode != 0:
            row["error"] = r.stderr.strip()[-400:]
        else:
            j = json.load(open(out))
            z = j["rows"][0]
            for k in ("decode_tokens_per_s", "decode_peak_bytes", "cache_bytes_after_decode", "prefill_tokens_per_s"):
                if k in z:
                    row[k] = z[k]
            row["weights_bytes"] = j["params"]["bytes"]
            row["zoo_git"] = j["env"]["git"]
            if "decode_peak_bytes" in row:
                row["peak_over_weights_kv"] = row["decode_peak_bytes"] / (row["weights_bytes"] + row["kv_bytes"])
    print(json.dumps(row), flush=True)
    return row


def bench_zoo(layers, d, h, shapes, a, kernels):
    cfg = zoo_config(layers, d, h)
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
    ap.add_argument("--decode-batches", default="1,32",
                    help="decode alone at T = 4096 on the 8L-512 model for these batch sizes ('' skips)")
    ap.add_argument("--zoo-decode-kernels", default="split-fit",
                    help="zoo's decoding attention kernels to bench in the decode section (split-fit, zoo's "
                         "default since stop 37; split, 8 rows a block; rows)")
    ap.add_argument("--out", default="twins-h200.json")
    a = ap.parse_args()
    impls = a.impls.split(",")
    res = {"schema": "zoo.twin-bench/1", "device": torch.cuda.get_device_name(0), "dtype": "bf16",
           "torch": torch.__version__, "protocol": __doc__.strip().split("\n\n")[1], "models": {}}
    import transformers
    res["transformers"] = transformers.__version__
    res["complete"] = False

    def save():
        # Written after every section (atomically), so a call that runs out of time keeps what
        # it measured; `complete` turns true at the end.
        tmp = a.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(res, f, indent=1)
        os.replace(tmp, a.out)
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
        save()
    batches = [int(x) for x in a.decode_batches.split(",") if x.strip()]
    if batches:
        layers, d, h, t = 8, 512, 8, 4096
        rows, ratios = [], {}
        for b in batches:
            rows += [bench_zoo_decode(layers, d, h, t, b, a, k) for k in a.zoo_decode_kernels.split(",")]
            rows += [bench_decode(kind, layers, d, h, t, b, a) for kind in ("eager", "hf")]
            by = {r["impl"]: r for r in rows if r["batch"] == b}
            for zi in [i for i in by if i.startswith("zoo-fused")]:
                z = by[zi]
                for other in ("eager", "hf"):
                    if "decode_tokens_per_s" in z and "decode_tokens_per_s" in by.get(other, {}):
                        ratios[f"T{t}xB{b} {zi}/{other} decode_tokens_per_s"] = z["decode_tokens_per_s"] / by[other]["decode_tokens_per_s"]
            for impl, r in by.items():
                if "peak_over_weights_kv" in r:
                    ratios[f"T{t}xB{b} {impl} decode peak / (weights + kv)"] = r["peak_over_weights_kv"]
            # Saved after each batch size, so a call cut short keeps the batches it finished.
            res["decode"] = {"model": "8L-512", "layers": layers, "d_model": d, "heads": h, "seq_len": t,
                             "protocol": bench_decode.__doc__.strip(), "rows": rows, "ratios": ratios,
                             "batches_done": batches[:batches.index(b) + 1]}
            save()
    res["complete"] = True
    save()
    print(json.dumps({n: m["ratios"] for n, m in res["models"].items()}, indent=1))
    if "decode" in res:
        print(json.dumps(res["decode"]["ratios"], indent=1))


if __name__ == "__main__":
    main()
