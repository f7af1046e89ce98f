#!/usr/bin/env bash
# Run a config's sweep on a GPU machine as N parallel shards (candle is launch-bound at these model
# sizes, so several processes keep one GPU busier), within a time limit; finished runs are kept
# (results are written per run), so a later call continues where this one stopped.
# usage: scripts/device-sweep.sh CONFIG SHARDS SECONDS [extra zoo args]
set -u
cfg=$1; n=$2; secs=$3; shift 3
ZOO=${ZOO:-/tmp/zoo}
for i in $(seq 0 $((n - 1))); do
  timeout "$secs" "$ZOO" run "$cfg" --device cuda:0 --dtype bf16 --shard "$i/$n" -q "$@" > "/tmp/shard-$i.log" 2>&1 &
done
wait
for i in $(seq 0 $((n - 1))); do tail -2 "/tmp/shard-$i.log"; done
