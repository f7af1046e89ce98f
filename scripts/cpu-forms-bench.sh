#!/usr/bin/env bash
# The ops' CPU forms against the compositions they replace on the CPU, as `zoo bench` train steps
# of whole models, in one command: every model benched with ZOO_KERNELS=naive (the compositions)
# and with the default (fused: the CPU forms of zoo_kernels::linear_scan for GLA, delta_scan,
# conv1d and cross_entropy, and the LM head fused into the training loss), alternating, ROUNDS
# rounds, into results/bench/cpu-forms/{naive,fused}/<run>-r<round>.json, then `zoo report` of
# each folder.
# Models: the quickstart's GLA (d 64, 128), its GLA + attention hybrid (d 128) and attention
# (d 128: only its BaseConv layer and the loss change), and configs/recall-gate-ablation.toml's
# RetNet (whose scalar decay keeps the chunked form: only the conv layer and the loss change) and
# Gated DeltaNet (d 64), each at its config's T = 64 and batch 32; and, into
# results/bench/cpu-loss/{naive,fused}/ (another shape, so another report), configs/bench-baseline-cpu.toml
# (vocab 32768: the loss and the LM head) at T = 256, batch 8. Prefill and decode keep the
# compositions in both modes (they hold a state).
# Then the allocator's purge delay, the same way: configs/bench-baseline-cpu.toml with
# MIMALLOC_PURGE_DELAY=10 (freed memory goes back to the OS after 10 ms) and with
# zoo's default (an hour), into results/bench/cpu-purge/{10ms,default}/. And the fused loss's
# backward, the same way: configs/bench-baseline-cpu.toml with ZOO_CE_KEEP_BYTES=0 (the logits
# recomputed chunk by chunk) and with the default (softmax − one-hot kept from the forward), into
# results/bench/cpu-loss-keep/{recompute,keep}/.
# usage: scripts/cpu-forms-bench.sh [ROUNDS]
set -eu
rounds=${1:-3}
ZOO=${ZOO:-target/release/zoo}
out=${OUT_DIR:-results/bench/cpu-forms}
loss=${LOSS_DIR:-results/bench/cpu-loss}
purge=${PURGE_DIR:-results/bench/cpu-purge}
keep=${KEEP_DIR:-results/bench/cpu-loss-keep}
mkdir -p "$out/naive" "$out/fused" "$loss/naive" "$loss/fused" "$purge/10ms" "$purge/default" "$keep/recompute" "$keep/keep"
# config:run index:T:batch:folder
benches="configs/quickstart.toml:7:64:32:$out configs/quickstart.toml:8:64:32:$out configs/quickstart.toml:11:64:32:$out
configs/quickstart.toml:2:64:32:$out configs/recall-gate-ablation.toml:4:64:32:$out configs/recall-gate-ablation.toml:8:64:32:$out
configs/bench-baseline-cpu.toml:0:256:8:$loss"
bench() { # label dir cfg index T B [env...]
  local name=$1 dir=$2 cfg=$3 i=$4 t=$5 b=$6; shift 6
  env "$@" "$ZOO" bench "$cfg" --run-index "$i" --seq-lens "$t" --batch "$b" --warmup 2 --iters 10 \
    --decode-tokens 16 -q --out "$dir/$name.json" > /dev/null
}
for r in $(seq 1 "$rounds"); do
  for e in $benches; do
    IFS=: read -r cfg i t b dir <<< "$e"
    name=$("$ZOO" run "$cfg" --dry-run | sed -n "$((i + 1))p" | sed 's/__.*//')
    [ "$name" = default ] && name=$(basename "$cfg" .toml)
    for mode in naive fused; do
      bench "$name-r$r" "$dir/$mode" "$cfg" "$i" "$t" "$b" ZOO_KERNELS=$mode
      echo "round $r: $name ($mode)"
    done
  done
  bench "bench-baseline-cpu-r$r" "$purge/10ms" configs/bench-baseline-cpu.toml 0 256 8 MIMALLOC_PURGE_DELAY=10
  bench "bench-baseline-cpu-r$r" "$purge/default" configs/bench-baseline-cpu.toml 0 256 8 ZOO_KERNELS=fused
  echo "round $r: purge delay 10 ms and default"
  bench "bench-baseline-cpu-r$r" "$keep/recompute" configs/bench-baseline-cpu.toml 0 256 8 ZOO_CE_KEEP_BYTES=0
  bench "bench-baseline-cpu-r$r" "$keep/keep" configs/bench-baseline-cpu.toml 0 256 8 ZOO_KERNELS=fused
  echo "round $r: the loss's backward recomputing and keeping"
done
for d in "$out/naive" "$out/fused" "$loss/naive" "$loss/fused" "$purge/10ms" "$purge/default" "$keep/recompute" "$keep/keep"; do
  "$ZOO" report "$d" > /dev/null  # writes report.md there
done
