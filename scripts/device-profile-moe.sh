#!/usr/bin/env bash
# Where an MoE LM's training step goes on the GPU machine (issue 14: E8 k2 trains at 0.20x the
# dense twin on the H200, results/bench/moe-cuda), in one device call: for the dense and the E8 k2
# grouped and tiled variants of configs/moe-bench.toml (4 layers, d 128, T 128, batch 16; bf16, fused
# kernels),
#  1. zoo's own train_seconds over STEPS steps of one process (ms per step);
#  2. ncu's GPU time by kernel per step (6 steps minus 3, scripts/ncu-step-diff.py): if it is far
#     below part 1's step time, the step waits on the host (launches, the expert lengths read back).
# Output: $OUT/profile-moe.txt and the ncu CSVs. Carry .devpkg (zoo.xz or zoo.gz).
#   device:  run(command="bash scripts/device-profile-moe.sh", carry=[".devpkg"], timeout_s=400)
# CFG picks another bench config (e.g. configs/moe-bench-512.toml: 8 layers, d 512, 8192 tokens a
# step, where E8 k2 grouped trains at 0.33x dense on the H100) and VARIANTS its variants.
# usage: [CFG=...] [VARIANTS="a b"] [PART=1] scripts/device-profile-moe.sh [STEPS]
set -u
steps=${1:-100}
cfg=${CFG:-configs/moe-bench.toml}
variants=${VARIANTS:-dense_active e8k2_grouped e8k2_tiled}
. "$(dirname "$0")/device-lib.sh"
zoo_binary
out=${OUT:-/tmp/out}; mkdir -p "$out"; log=$out/profile-moe.txt
# configs/moe-bench.toml trains 1 step; these copies train N steps, evaluating never.
mk() { sed -e "s/^steps = .*/steps = $1/" -e 's/^experiment = .*/experiment = "prof-moe"/' "$cfg" > "$2"; }
secs() { python3 -c "import json,sys; j=json.load(open(sys.argv[1])); print(round(j['throughput']['train_seconds'], 3))" "$1"; }
index() { /tmp/zoo run "$cfg" --dry-run | grep -n "^$1__" | cut -d: -f1 | awk '{print $1 - 1}'; }
nruns=$(/tmp/zoo run "$cfg" --dry-run | grep -c "__")
mk 10 /tmp/moe-warm.toml
/tmp/zoo run /tmp/moe-warm.toml --device cuda:0 --dtype bf16 --shard 0/$nruns -q --results-dir /tmp/moe-warm --runs-dir /tmp/moe-warm/runs > /dev/null 2>> "$log"
mk "$steps" /tmp/moe-prof.toml
echo "## 1. one process alone, $steps steps (train_seconds; ms per step)" | tee -a "$log"
for v in $variants; do
  i=$(index $v); rd=/tmp/moe-r1-$v; rm -rf $rd
  /tmp/zoo run /tmp/moe-prof.toml --device cuda:0 --dtype bf16 --shard $i/$nruns -q --results-dir $rd --runs-dir $rd/runs > /dev/null 2>> "$log"
  s=$(secs "$(ls $rd/prof-moe/*.json)")
  echo "$v: $s s, $(python3 -c "print(round(1000*$s/$steps, 2))") ms/step" | tee -a "$log"
done
# PART=1: the step times only (no ncu).
[ "${PART:-all}" = 1 ] && exit 0
echo "## 2. GPU time by kernel, per step (ncu; 6 steps minus 3)" | tee -a "$log"
for v in $variants; do
  i=$(index $v)
  for n in 3 6; do
    mk $n /tmp/moe-p$n.toml; rd=/tmp/moe-r2-$v-$n; rm -rf $rd
    timeout 150 ncu --csv --metrics gpu__time_duration.sum --clock-control none \
      /tmp/zoo run /tmp/moe-p$n.toml --device cuda:0 --dtype bf16 --shard $i/$nruns -q --results-dir $rd --runs-dir $rd/runs \
      > "$out/ncu-moe-$v-$n.csv" 2> /dev/null
  done
  echo "### $v" | tee -a "$log"
  python3 scripts/ncu-step-diff.py "$out/ncu-moe-$v-3.csv" "$out/ncu-moe-$v-6.csv" 3 | tee -a "$log"
done
