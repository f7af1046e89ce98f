#!/usr/bin/env bash
# The throughput crossover of issue 4: `zoo bench` for each model of configs/linear-lm.toml
# (softmax Transformer, linear, RetNet, GLA, Based+SWA, DeltaNet, the 1:1 hybrid) over T, one
# process per model (clean peak-memory readings), into results/crossover-<device>/, then the report.
# usage: scripts/crossover.sh cpu|cuda [seq lens] [extra zoo bench args]
#   cpu:  T = 256..2048 by default (2 cores: the longer lengths take tens of minutes per model;
#         softmax is capped at 4096: its unfused T² training tensors outgrow 24 GiB beyond)
#   cuda: T = 512..16384, bf16
set -u
dev=${1:-cpu}; shift || true
ZOO=${ZOO:-target/release/zoo}
cfg=configs/linear-lm.toml
# plan indices of seed 0 of each variant (3 seeds per variant)
models="0 3 6 9 12 15 21"
if [ "$dev" = cuda ]; then
  out=results/crossover-h100; lens=${1:-512,1024,2048,4096,8192,16384}; args="--device cuda:0 --dtype bf16"
else
  out=results/crossover-cpu; lens=${1:-256,512,1024,2048}; args=""
fi
shift || true
mkdir -p "$out"
for i in $models; do
  l=$lens
  [ "$dev" = cpu ] && [ "$i" = 0 ] && l=$(echo "$lens" | tr ',' '\n' | awk '$1 <= 4096' | paste -sd,)
  "$ZOO" bench "$cfg" --run-index "$i" --seq-lens "$l" --batch 1 --warmup 1 --iters 3 --decode-tokens 16 \
    $args -q --out "$out/model-$i.json" "$@" > /dev/null || echo "bench of run $i failed"
  echo "model $i done"
done
"$ZOO" report "$out" > /dev/null && echo "wrote $out/report.md"
