#!/usr/bin/env bash
# The ops' CPU forms against the compositions they replace on the CPU, as `zoo bench` train steps
# of whole models, in one command: every model benched with ZOO_KERNELS=naive (the compositions)
# and with the default (fused: the CPU forms of zoo_kernels::linear_scan for GLA, delta_scan and
# conv1d, the short convolutions), alternating, ROUNDS rounds, into
# results/bench/cpu-forms/{naive,fused}/<run>-r<round>.json, then `zoo report` of each folder.
# Models: the quickstart's GLA (d 64, 128), its GLA + attention hybrid (d 128) and attention
# (d 128: only its BaseConv layer changes), and configs/recall-gate-ablation.toml's RetNet (whose
# scalar decay keeps the chunked form: only the conv layer changes) and Gated DeltaNet (d 64);
# each at its config's T = 64 and batch 32. Prefill and decode keep the compositions in both
# modes (they hold a state).
# usage: scripts/cpu-forms-bench.sh [ROUNDS]
set -eu
rounds=${1:-3}
ZOO=${ZOO:-target/release/zoo}
out=${OUT_DIR:-results/bench/cpu-forms}
mkdir -p "$out/naive" "$out/fused"
benches="configs/quickstart.toml:7 configs/quickstart.toml:8 configs/quickstart.toml:11 configs/quickstart.toml:2
configs/recall-gate-ablation.toml:4 configs/recall-gate-ablation.toml:8"
for r in $(seq 1 "$rounds"); do
  for b in $benches; do
    cfg=${b%:*}; i=${b#*:}
    name=$("$ZOO" run "$cfg" --dry-run | sed -n "$((i + 1))p" | sed 's/__.*//')
    for mode in naive fused; do
      ZOO_KERNELS=$mode "$ZOO" bench "$cfg" --run-index "$i" --seq-lens 64 --batch 32 --warmup 2 --iters 10 \
        --decode-tokens 16 -q --out "$out/$mode/$name-r$r.json" > /dev/null
      echo "round $r: $name ($mode)"
    done
  done
done
for mode in naive fused; do
  "$ZOO" report "$out/$mode" > /dev/null  # writes report.md there
done
