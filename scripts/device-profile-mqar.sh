#!/usr/bin/env bash
# Where an MQAR training step's time goes on the GPU machine, in one device call (issue 9's grid
# is paid in device minutes, so this decides how to spend them):
#  1. step time of one process alone (zoo's own train_seconds over N steps, bf16, fused kernels),
#     for GLA + short conv, DeltaNet and attention at d = 128, batch 256 (configs/mqar-long*.toml);
#  2. GPU time per step by kernel (ncu, gpu__time_duration of every kernel launched in S2 - S1
#     extra steps; startup and evaluation cancel in the difference): if the kernels' sum is far
#     below the step time, the step is bound by the host (launches and syncs), not by the GPU;
#  3. aggregate steps/s of 1, 4 and 8 concurrent processes of the same run (under CUDA MPS when
#     the daemon starts), i.e. how many pool workers pay.
# Everything lands in $OUT (profile.txt, ncu CSVs). Carry .devpkg (zoo.gz). PARTS picks parts
# (default 123); VARIANTS the runs of part 1 (default 0 1 2: gla_conv, deltanet, attention).
# The first process of a fresh machine JIT-compiles the PTX of candle's and zoo's kernels (about
# 20 s inside its first step): a 20-step warm-up run goes first, so part 1 times warm processes.
# usage: scripts/device-profile-mqar.sh [STEPS]
set -u
steps=${1:-200}; parts=${PARTS:-123}
. "$(dirname "$0")/device-lib.sh"
# Always this call's binary, not one an earlier call left.
rm -f /tmp/zoo && zoo_binary
out=${OUT:-/tmp/out}; mkdir -p "$out"; log=$out/profile.txt
cfg=/tmp/prof.toml
# The long-budget MQAR model and data (configs/mqar-long-conv.toml) with small test sets.
sed -e 's/^experiment = .*/experiment = "prof"/' -e 's/examples = 1000 }/examples = 64 }/' \
    -e "s/^steps = .*/steps = STEPS/" -e "s/^warmup_steps = .*/warmup_steps = 1/" -e 's/^eval_every = .*/eval_every = 100000/' \
    configs/mqar-long-conv.toml | awk '/^\[\[sweep.variants\]\]/ { exit } { print }' > $cfg.in
cat >> $cfg.in <<'EOF'
[[sweep.variants]]
name = "gla_conv"
set = { "model.mixers.mix" = { type = "gla", n_heads = 2, short_conv = 4 } }

[[sweep.variants]]
name = "deltanet"
set = { "model.mixers.mix" = { type = "deltanet", n_heads = 2, output_gate = "none", short_conv = 4 } }

[[sweep.variants]]
name = "attention"
EOF
mk() { sed "s/STEPS/$1/" $cfg.in > "$2"; }
secs() { python3 -c "import json,sys; j=json.load(open(sys.argv[1])); print(round(j['throughput']['train_seconds'], 3))" "$1"; }
nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv,noheader | tee -a "$log"

mk 20 /tmp/warm.toml
/tmp/zoo run /tmp/warm.toml --device cuda:0 --dtype bf16 --shard 0/3 -q --results-dir /tmp/warm --runs-dir /tmp/warm/runs > /dev/null 2>> "$log"
mk "$steps" $cfg
[[ $parts == *1* ]] && echo "## 1. one process alone, $steps steps (train_seconds; ms per step)" | tee -a "$log"
[[ $parts == *1* ]] && for i in ${VARIANTS:-0 1 2}; do
  rd=/tmp/r1-$i; rm -rf $rd
  /tmp/zoo run $cfg --device cuda:0 --dtype bf16 --shard $i/3 -q --results-dir $rd --runs-dir $rd/runs 2>> "$log"
  f=$(ls $rd/prof/*.json); s=$(secs "$f")
  echo "$(basename "$f"): $s s, $(python3 -c "print(round(1000*$s/$steps, 1))") ms/step" | tee -a "$log"
done

[[ $parts == *2* ]] && echo "## 2. GPU time by kernel, per step (ncu; 6 steps minus 3)" | tee -a "$log"
[[ $parts == *2* ]] && for i in ${VARIANTS:-0 1}; do
  for n in 3 6; do
    mk $n /tmp/p$n.toml; rd=/tmp/r2-$i-$n; rm -rf $rd
    timeout 200 ncu --csv --metrics gpu__time_duration.sum --clock-control none \
      /tmp/zoo run /tmp/p$n.toml --device cuda:0 --dtype bf16 --shard $i/3 -q --results-dir $rd --runs-dir $rd/runs \
      > "$out/ncu-$i-$n.csv" 2> /dev/null
  done
  python3 scripts/ncu-step-diff.py "$out/ncu-$i-3.csv" "$out/ncu-$i-6.csv" 3 | tee -a "$log"
done

[[ $parts == *3* ]] || exit 0
echo "## 3. concurrent processes of gla_conv ($steps steps each): aggregate" | tee -a "$log"
export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
nvidia-cuda-mps-control -d 2>> "$log" && echo "MPS daemon started" | tee -a "$log" || echo "MPS daemon not started" | tee -a "$log"
for w in 1 4 8; do
  t0=$(date +%s.%N)
  for p in $(seq 1 $w); do
    rd=/tmp/r3-$w-$p; rm -rf $rd
    /tmp/zoo run $cfg --device cuda:0 --dtype bf16 --shard 0/3 -q --results-dir $rd --runs-dir $rd/runs 2>> "$log" &
  done
  wait
  t1=$(date +%s.%N)
  per=$(for p in $(seq 1 $w); do secs /tmp/r3-$w-$p/prof/*.json; done | tr '\n' ' ')
  echo "$w processes: wall $(python3 -c "print(round($t1-$t0,1))") s; train_seconds each: $per; aggregate $(python3 -c "print(round($w*$steps/($t1-$t0),1))") steps/s" | tee -a "$log"
done
echo quit | nvidia-cuda-mps-control > /dev/null 2>&1 || true
