#!/usr/bin/env bash
# MoE throughput against the dense twin (issue 14, experiment 3): `zoo bench` of every variant of
# configs/moe-bench.toml in one command, ROUNDS alternating rounds (each round benches every
# variant once, in plan order), into results/bench/moe-<device>/<variant>-r<round>.json. Compare
# medians over rounds within one command's output only.
# usage: scripts/moe-bench.sh cpu|cuda [ROUNDS] [extra zoo bench args]
# Environment: CFG (default configs/moe-bench.toml), T (sequence length, default 128), BATCH
# (default 16), OUT_DIR (default results/bench/moe-<device>, with -512 for configs/moe-bench-512.toml),
# VARIANTS (a space-separated subset of the config's variants; default all), FIRST_ROUND (the
# first round's number, default 1: calls that alternate with other settings number on).
set -eu
dev=${1:-cpu}; rounds=${2:-3}; shift 2 || shift $#
ZOO=${ZOO:-target/release/zoo}
cfg=${CFG:-configs/moe-bench.toml}
tag=$(basename "$cfg" .toml | sed 's/^moe-bench//')
out=${OUT_DIR:-results/bench/moe-$dev$tag}
T=${T:-128}; BATCH=${BATCH:-16}
args=""; [ "$dev" = cuda ] && args="--device cuda:0 --dtype bf16"
mkdir -p "$out"
names=$("$ZOO" run "$cfg" --dry-run | head -n -1 | sed 's/__.*//')
first=${FIRST_ROUND:-1}
for r in $(seq "$first" $((first + rounds - 1))); do
  i=0
  for n in $names; do
    if [ -n "${VARIANTS:-}" ] && ! echo " $VARIANTS " | grep -q " $n "; then i=$((i + 1)); continue; fi
    # shellcheck disable=SC2086
    "$ZOO" bench "$cfg" --run-index "$i" --seq-lens "$T" --batch "$BATCH" --warmup 2 --iters 10 --decode-tokens 16 \
      $args -q --out "$out/$n-r$r.json" "$@" > /dev/null
    echo "round $r: $n"
    i=$((i + 1))
  done
done
