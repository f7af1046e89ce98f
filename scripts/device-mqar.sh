#!/usr/bin/env bash
# One device call of an MQAR grid (default configs/mqar.toml; configs/mqar-2k.toml is the
# long-budget grid) on the GPU machine, resumable across calls and sessions: earlier results
# travel in (.devpkg/prior.tgz, made from results/<experiment>), finished runs are skipped, new
# runs start until BUDGET_S seconds have passed (keep BUDGET_S a run's length under the call's
# limit: with 4 workers a 2000-step d <= 128 run takes 1-4 min, a d = 256 run longer), and every
# result made comes back as $OUT/mqar.tgz. Order: both seeds of the first learning rate of
# LR_ORDER (default 0.003,0.001,0.01), then the next (POOL_LR_FIRST).
#   here:    scripts/build-cuda.sh && tar czf .devpkg/prior.tgz -C results/EXP $(cd results/EXP && ls *.json)
#   device:  run(command="bash scripts/device-mqar.sh 480 4 configs/mqar-2k.toml", carry=[".devpkg"], timeout_s=590)
#   here:    tar xzf <files_at>/mqar.tgz -C results/EXP && zoo report results/EXP (a warm machine also keeps
#            every result in runs/EXP.results/ and restores the ones our tree lacks at the next call)
# Runs that are still going at STOP_S seconds (env; default BUDGET_S + 60) are stopped with a
# checkpoint (device-pool.sh POOL_STOP_S) and continue at the next call: on a warm machine from
# runs/, which stays there between calls; across sessions from .devpkg/ckpt.tgz.*, which
# SHIP_CKPT=1 writes to $OUT, the furthest-trained checkpoints that fit the device's limit on
# returned files (move them to .devpkg/ here; a checkpoint already on the machine wins).
# usage: [STOP_S=S] [SHIP_CKPT=1] [WITH_TESTS=1] scripts/device-mqar.sh BUDGET_S WORKERS [CONFIG]
set -u
budget=$1; workers=$2; cfg=${3:-configs/mqar.toml}
exp=$(sed -n 's/^experiment = "\(.*\)"/\1/p' "$cfg")
res=results/$exp
. "$(dirname "$0")/device-lib.sh"
zoo_binary
mkdir -p "$res"
[ -f .devpkg/prior.tgz ] && tar xzf .devpkg/prior.tgz -C "$res" && echo "prior results: $(ls "$res"/*.json | wc -l)"
# Results made by an earlier call on this (warm) machine: the call replaced the working tree with
# ours, so bring back the ones we have not copied in yet (runs/ is ignored, so it stays).
keep=runs/$exp.results
if [ -d "$keep" ]; then
  for f in "$keep"/*.json; do [ -e "$res/$(basename "$f")" ] || cp "$f" "$res/"; done
  echo "results kept on this machine: $(ls "$keep"/*.json | wc -l)"
fi
if ls .devpkg/ckpt.tgz.* > /dev/null 2>&1; then
  mkdir -p runs
  if cat .devpkg/ckpt.tgz.* | gzip -t 2> /dev/null; then
    # The older form: one gzipped tar of checkpoint folders.
    cat .devpkg/ckpt.tgz.* | tar xzf - -C runs --skip-old-files && echo "checkpoints brought in"
  else
    # A tar of one .tgz per checkpoint (below).
    rm -rf /tmp/ckin && mkdir -p /tmp/ckin && cat .devpkg/ckpt.tgz.* | tar xf - -C /tmp/ckin
    for f in /tmp/ckin/*.tgz; do tar xzf "$f" -C runs --skip-old-files; done
    echo "checkpoints brought in: $(ls /tmp/ckin | wc -l)"
  fi
fi
# WITH_TESTS=1: the CUDA test binaries in .devpkg/tests (scripts/build-cuda.sh --tests) run beside
# the pool, for correctness only (they share the GPU with the pool's runs, so nothing they time
# means anything): every test, then the flash tests again with the WMMA (ZOO_FLASH_MMA=0) and
# ldmatrix (=2) attention kernels, into $OUT/tests.log (a fourth returned file: CKPT_PIECES <= 4).
# They start once the pool's MPS daemon is up, so that they are its clients too, and end by 375 s
# (device-lib.sh's kernel_tests, as device-checks.sh kernels runs them).
tests=""
if [ "${WITH_TESTS:-0}" = 1 ] && ls .devpkg/tests/*.gz .devpkg/tests/*.xz 2> /dev/null | grep -q .; then
  ( exec > /dev/null 2>&1 < /dev/null
    sleep 15
    export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe
    : > "$OUT/tests.log"
    kernel_tests "$OUT/tests.log" ) &
  tests=$!
fi
POOL_STOP_S=${STOP_S:-$((budget + 60))} ZOO=/tmp/zoo POOL_LR_FIRST=1 POOL_LR_ORDER=${LR_ORDER:-0.003,0.001,0.01} scripts/device-pool.sh "$cfg" "$budget" "$workers" \
  > "$OUT/pool.log" 2>&1
if [ -n "$tests" ]; then
  wait "$tests"
  grep -E "^== |^test result|FAILED|panicked" "$OUT/tests.log" | head -30
fi
# No background job may outlive this script: the device call waits for every holder of its output
# (device-pool.sh leaves the MPS daemon running; stop it).
CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe nvidia-cuda-mps-control <<< quit > /dev/null 2>&1 || true
tar czf "$OUT/mqar.tgz" -C "$res" $(cd "$res" && ls *.json)
mkdir -p "$keep" && cp "$res"/*.json "$keep/"
cp /tmp/pool-errors.log "$OUT/" 2>/dev/null
if [ "${SHIP_CKPT:-0}" = 1 ] && [ -d "runs/$exp" ]; then
  # Checkpoints of unfinished runs (a finished run has its JSON), the furthest-trained first, each
  # its own .tgz, as many as fit in CKPT_PIECES (default 5) pieces of 15 MiB: the device returns
  # at most 8 files, and mqar.tgz, pool.log and pool-errors.log take three (a sixth piece would be
  # lost, and with it every checkpoint in the stream after it). The rest are named and stay in
  # runs/ on this machine while it is warm.
  rm -rf /tmp/ckship && mkdir -p /tmp/ckship
  budget=$(( ${CKPT_PIECES:-5} * 15 * 1048576 - 1048576 )); total=0; take=""; left=""
  for r in $(cd "runs/$exp" && for r in *; do
               [ -f "$r/checkpoint/COMPLETE" ] && [ ! -f "../../$res/$r.json" ] && echo "$(cat "$r/checkpoint/COMPLETE") $r"
             done | sort -rn | awk '{print $2}'); do
    tar czf "/tmp/ckship/$r.tgz" -C runs "$exp/$r/checkpoint"
    size=$(stat -c %s "/tmp/ckship/$r.tgz")
    if [ $((total + size)) -le "$budget" ]; then total=$((total + size)); take="$take $r.tgz"; else left="$left $r"; rm "/tmp/ckship/$r.tgz"; fi
  done
  if [ -n "$take" ]; then
    (cd /tmp/ckship && tar cf - $take) | split -b 15m - "$OUT/ckpt.tgz." && echo "shipped checkpoints:$take ($((total / 1048576)) MiB)"
  fi
  [ -n "$left" ] && echo "checkpoints not shipped (over the size limit):$left"
fi
tail -3 "$OUT/pool.log"; echo "results: $(ls "$res"/*.json | wc -l)"
