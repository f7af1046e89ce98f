#!/usr/bin/env bash
# Run the runs of a sweep one at a time on the GPU (one process is faster than several here),
# starting no new run once SECONDS have passed, so a device call never cuts a run off.
# Finished runs (result JSON present) are skipped by `zoo run`.
# usage: scripts/device-runs.sh CONFIG SECONDS [extra zoo args]
set -u
cfg=$1; budget=$2; shift 2
ZOO=${ZOO:-/tmp/zoo}
n=$("$ZOO" run "$cfg" --dry-run | tail -1 | cut -d' ' -f1)
start=$(date +%s)
for i in $(seq 0 $((n - 1))); do
  [ $(( $(date +%s) - start )) -gt "$budget" ] && { echo "time budget reached before run $i of $n"; break; }
  "$ZOO" run "$cfg" --device cuda:0 --dtype bf16 --shard "$i/$n" -q "$@" || echo "run $i failed"
done
