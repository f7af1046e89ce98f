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
#   here:    tar xzf <files_at>/mqar.tgz -C results/EXP && zoo report results/EXP
# usage: scripts/device-mqar.sh BUDGET_S WORKERS [CONFIG]
set -u
budget=$1; workers=$2; cfg=${3:-configs/mqar.toml}
exp=$(sed -n 's/^experiment = "\(.*\)"/\1/p' "$cfg")
res=results/$exp
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib
[ -x /tmp/zoo ] || { gunzip -c .devpkg/zoo.gz > /tmp/zoo && chmod +x /tmp/zoo; }
mkdir -p "$res"
[ -f .devpkg/prior.tgz ] && tar xzf .devpkg/prior.tgz -C "$res" && echo "prior results: $(ls "$res"/*.json | wc -l)"
ZOO=/tmp/zoo POOL_LR_FIRST=1 POOL_LR_ORDER=${LR_ORDER:-0.003,0.001,0.01} scripts/device-pool.sh "$cfg" "$budget" "$workers" \
  > "$OUT/pool.log" 2>&1
# No background job may outlive this script: the device call waits for every holder of its output
# (device-pool.sh leaves the MPS daemon running; stop it).
CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe nvidia-cuda-mps-control <<< quit > /dev/null 2>&1 || true
tar czf "$OUT/mqar.tgz" -C "$res" $(cd "$res" && ls *.json)
cp /tmp/pool-errors.log "$OUT/" 2>/dev/null
tail -3 "$OUT/pool.log"; echo "results: $(ls "$res"/*.json | wc -l)"
