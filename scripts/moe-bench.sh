#!/usr/bin/env bash
# MoE throughput against the dense twin (issue 14, experiment 3): `zoo bench` of every variant of
# configs/moe-bench.toml in one command, ROUNDS alternating rounds (each round benches every
# variant once, in plan order), into results/bench/moe-<device>/<variant>-r<round>.json. Compare
# medians over rounds within one command's output only.
# usage: scripts/moe-bench.sh cpu|cuda [ROUNDS] [extra zoo bench args]
set -eu
dev=${1:-cpu}; rounds=${2:-3}; shift 2 || shift $#
ZOO=${ZOO:-target/release/zoo}
cfg=configs/moe-bench.toml
out=results/bench/moe-$dev
args=""; [ "$dev" = cuda ] && args="--device cuda:0 --dtype bf16"
mkdir -p "$out"
names=$("$ZOO" run "$cfg" --dry-run | head -n -1 | sed 's/__.*//')
for r in $(seq 1 "$rounds"); do
  i=0
  for n in $names; do
    # shellcheck disable=SC2086
    "$ZOO" bench "$cfg" --run-index "$i" --seq-lens 128 --batch 16 --warmup 2 --iters 10 --decode-tokens 16 \
      $args -q --out "$out/$n-r$r.json" "$@" > /dev/null
    echo "round $r: $n"
    i=$((i + 1))
  done
done
