#!/usr/bin/env bash
# One device call of the MQAR grid (configs/mqar.toml) on the GPU machine, resumable across calls
# and sessions: earlier results travel in (.devpkg/prior.tgz, made from results/mqar), finished
# runs are skipped, new runs start until BUDGET_S seconds have passed (a run took 150-520 s with
# 14 workers, so keep BUDGET_S at least 520 s under the call's limit), and every result made comes
# back as $OUT/mqar.tgz. Order: both seeds of lr 3e-3, then 1e-3, then 1e-2 (POOL_LR_FIRST).
#   here:    scripts/build-cuda.sh && tar czf .devpkg/prior.tgz -C results/mqar $(cd results/mqar && ls *.json)
#   device:  run(command="bash scripts/device-mqar.sh 60 14", carry=[".devpkg"], timeout_s=590)
#   here:    tar xzf <files_at>/mqar.tgz -C results/mqar && zoo report results/mqar
# usage: scripts/device-mqar.sh BUDGET_S WORKERS
set -u
budget=$1; workers=$2
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib
gunzip -c .devpkg/zoo.gz > /tmp/zoo && chmod +x /tmp/zoo
mkdir -p results/mqar
[ -f .devpkg/prior.tgz ] && tar xzf .devpkg/prior.tgz -C results/mqar && echo "prior results: $(ls results/mqar/*.json | wc -l)"
ZOO=/tmp/zoo POOL_LR_FIRST=1 POOL_LR_ORDER=0.003,0.001,0.01 scripts/device-pool.sh configs/mqar.toml "$budget" "$workers" \
  > "$OUT/pool.log" 2>&1
# No background job may outlive this script: the device call waits for every holder of its output
# (device-pool.sh leaves the MPS daemon running; stop it).
CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe nvidia-cuda-mps-control <<< quit > /dev/null 2>&1 || true
tar czf "$OUT/mqar.tgz" -C results/mqar $(cd results/mqar && ls *.json)
cp /tmp/pool-errors.log "$OUT/" 2>/dev/null
tail -3 "$OUT/pool.log"; echo "results: $(ls results/mqar/*.json | wc -l)"
