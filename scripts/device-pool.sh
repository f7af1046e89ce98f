#!/usr/bin/env bash
# Run a sweep's runs on one GPU with several worker processes at once: small models leave an H100
# mostly idle (one kernel launch at a time), so concurrent runs finish a sweep several times faster.
# Starts the CUDA MPS daemon when it can (one shared context, kernels of different processes
# overlap). Workers take run indices from a shared counter; none starts a run after SECONDS.
# Every run records ZOO_CONCURRENT_RUNS in its JSON: its tokens/s is then not a throughput number.
# Finished runs (result JSON present) are skipped by `zoo run`; every run starts with `--resume`,
# so a run stopped earlier continues from its checkpoint (runs/, kept on a warm machine between
# device calls, or brought back in by scripts/device-mqar.sh).
# With POOL_STOP_S set, the runs still going at that second get SIGTERM: each finishes its step,
# saves a checkpoint and exits (`zoo run` exits 143); nothing trained is lost.
# Runs start breadth-first, so a budget that ends the pool early leaves a usable table: sorted by
# seed, then by the rank of the run's learning rate in POOL_LR_ORDER (e.g. "0.003,0.001,0.01";
# unset or unlisted rates rank first), then by model width; ties keep the plan's order. With
# POOL_LR_FIRST=1 the learning-rate rank sorts before the seed, so a pool that stops early leaves
# every seed of the first rates rather than every rate of the first seed. The order is printed.
# POOL_SKIP (an awk regular expression over run ids) names runs not to start in this call, e.g.
# those whose checkpoints travel in a later call.
# usage: [POOL_STOP_S=S] scripts/device-pool.sh CONFIG SECONDS WORKERS [extra zoo args]
set -u
cfg=$1; budget=$2; workers=$3; shift 3
ZOO=${ZOO:-/tmp/zoo}
if command -v nvidia-cuda-mps-control > /dev/null; then
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  nvidia-cuda-mps-control -d 2> /dev/null && echo "MPS daemon started" || echo "MPS daemon not started"
else
  echo "no MPS control binary; workers time-slice the GPU"
fi
plan=$(mktemp); "$ZOO" run "$cfg" --dry-run > "$plan"
n=$(tail -1 "$plan" | cut -d' ' -f1)
# index, seed, lr rank, width: sort, keep the indices.
order=$(mktemp)
head -n "$n" "$plan" | awk -v lrs="${POOL_LR_ORDER:-}" -v skip="${POOL_SKIP:-}" '
  BEGIN { m = split(lrs, L, ","); for (i = 1; i <= m; i++) rank[L[i]] = i }
  skip != "" && $0 ~ skip { next }
  { id = $0; seed = id; sub(/.*__seed-/, "", seed); lr = id; sub(/.*__lr-/, "", lr); sub(/__.*/, "", lr)
    d = 0; if (match(id, /d_model-[0-9]+/)) d = substr(id, RSTART + 8, RLENGTH - 8)
    r = (lr in rank) ? rank[lr] : 0
    printf "%d %d %d %d\n", NR - 1, seed, r, d }' > "$order.keys"
if [ "${POOL_LR_FIRST:-0}" = 1 ]; then keys="-k3,3n -k2,2n -k4,4n"; else keys="-k2,2n -k3,3n -k4,4n"; fi
# shellcheck disable=SC2086
sort -s $keys "$order.keys" | cut -d' ' -f1 > "$order"
echo "run order: $(tr '\n' ' ' < "$order")"
n_all=$n; n=$(wc -l < "$order")
counter=$(mktemp); echo 0 > "$counter"
start=$(date +%s)
export ZOO_CONCURRENT_RUNS=$workers
# Each worker's CPU threads (data generation, host-side ops): the cores split among the workers,
# not every worker spawning a thread per core.
threads=$(( $(nproc) / workers )); [ "$threads" -ge 1 ] || threads=1
export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-$threads}
worker() {
  while true; do
    [ $(( $(date +%s) - start )) -gt "$budget" ] && break
    [ -e "$counter.stop" ] && break
    p=$(flock "$counter" sh -c 'i=$(cat "$0"); echo $((i + 1)) > "$0"; echo $i' "$counter")
    [ "$p" -ge "$n" ] && break
    i=$(sed -n "$((p + 1))p" "$order")
    "$ZOO" run "$cfg" --device cuda:0 --dtype bf16 --shard "$i/$n_all" --resume -q "$@" > /dev/null 2>> /tmp/pool-errors.log
    rc=$?
    case $rc in
      0) echo "run $i finished at $(( $(date +%s) - start )) s" ;;
      143) echo "run $i stopped at $(( $(date +%s) - start )) s (checkpointed)"; break ;;
      *) echo "run $i failed (exit $rc)" ;;
    esac
  done
}
pids=""
for w in $(seq 1 "$workers"); do worker & pids="$pids $!"; done
if [ -n "${POOL_STOP_S:-}" ]; then
  # The watchdog: SIGTERM to this pool's runs at POOL_STOP_S (then nothing new starts either).
  # Its output goes nowhere: a device call waits for every holder of its output files.
  ( exec > /dev/null 2>&1 < /dev/null; sleep "$POOL_STOP_S"; touch "$counter.stop"; pkill -TERM -f "$ZOO run $cfg" ) &
  watchdog=$!
fi
# shellcheck disable=SC2086
wait $pids
[ -n "${watchdog:-}" ] && { pkill -P "$watchdog" 2> /dev/null; kill "$watchdog" 2> /dev/null; }
echo "pool done after $(( $(date +%s) - start )) s; started $(cat "$counter") of $n runs"
