#!/usr/bin/env bash
# Where a softmax LM's training step goes on the GPU machine, at issue 11's twin shapes (the models
# of configs/bench-baseline.toml that scripts/twin-bench.py copies), in one device call: for each
# SHAPE "layers:d_model:heads:T:B" (default the 6L/384 model at 256 x 32 and the 8L/512 model at
# 4096 x 4, the shapes furthest from the torch.compile twin and from HF),
#  1. zoo's own train_seconds over STEPS steps of one process (ms per step; bf16, fused kernels);
#  2. ncu's GPU time by kernel per step (6 steps minus 3, scripts/ncu-step-diff.py): what to fuse
#     next, and whether the step waits on the host (GPU time per step far below part 1's).
# Output: $OUT/profile-train.txt. Carry .devpkg (zoo.gz).
#   device:  run(command="bash scripts/device-profile-train.sh", carry=[".devpkg"], timeout_s=590)
# usage: scripts/device-profile-train.sh [STEPS] [SHAPE ...]
set -u
. "$(dirname "$0")/device-lib.sh"
steps=${1:-20}; shift $(( $# > 0 ? 1 : 0 ))
shapes=${*:-"6:384:6:256:32 8:512:8:4096:4"}
zoo_binary
out=${OUT:-/tmp/out}; mkdir -p "$out"; log=$out/profile-train.txt
# configs/bench-baseline.toml at a shape, training N steps on MQAR sequences of length T (the
# tokens do not matter to the time), evaluating only at the end.
mk() { # layers d heads T B steps file
  baseline_at "$1" "$2" "$3" | sed -e "s/seq_len = 4096/seq_len = $4/g" -e "s/^batch_size = .*/batch_size = $5/" \
      -e "s/^steps = .*/steps = $6/" -e 's/^experiment = .*/experiment = "prof-train"/' > "$7"
  printf 'warmup_steps = 0\neval_every = 1000000\n' >> "$7"
}
secs() { python3 -c "import json,sys; j=json.load(open(sys.argv[1])); print(j['throughput']['train_seconds'])" "$1"; }
run() { # config results-dir
  rm -rf "$2"; /tmp/zoo run "$1" --device cuda:0 --dtype bf16 -q --results-dir "$2" --runs-dir "$2/runs" > /dev/null 2>> "$log"
}
for s in $shapes; do
  IFS=: read -r L D H T B <<< "$s"
  echo "## $L layers, d $D, $H heads, T $T x B $B" | tee -a "$log"
  mk "$L" "$D" "$H" "$T" "$B" 3 /tmp/prof-warm.toml; run /tmp/prof-warm.toml /tmp/prof-warm
  mk "$L" "$D" "$H" "$T" "$B" "$steps" /tmp/prof.toml; step 120 "zoo $steps steps" run /tmp/prof.toml /tmp/prof-r1
  f=$(ls /tmp/prof-r1/prof-train/*.json 2> /dev/null | head -1)
  [ -n "$f" ] && python3 -c "s=$(secs "$f"); print(f'one process alone: {1000 * s / $steps:.2f} ms per step ({$T * $B * $steps / s:.0f} tok/s)')" | tee -a "$log"
  for n in 3 6; do
    mk "$L" "$D" "$H" "$T" "$B" $n /tmp/prof-$n.toml; rm -rf /tmp/prof-n$n
    timeout 150 ncu --csv --metrics gpu__time_duration.sum --clock-control none \
      /tmp/zoo run /tmp/prof-$n.toml --device cuda:0 --dtype bf16 -q --results-dir /tmp/prof-n$n --runs-dir /tmp/prof-n$n/runs \
      > /tmp/ncu-train-$n.csv 2> /dev/null
  done
  python3 scripts/ncu-step-diff.py /tmp/ncu-train-3.csv /tmp/ncu-train-6.csv 3 | tee -a "$log"
done
