#!/usr/bin/env bash
# Does a CUDA run repeat itself? configs/determinism.toml (mqar-8k's GLA and attention at d 256,
# seed 0, 600 steps, bf16 through CUDA graphs) twice in each of three settings, alternating: the
# default (the embedding's sorted backward), ZOO_EMBEDDING_BWD=atomic (the scatter it replaced) and
# ZOO_DETERMINISTIC=1 (cuDNN's deterministic attention backward too); scripts/determinism-compare.py
# compares each pair bit for bit into $OUT/summary.json, and the twelve result JSONs come back in
# $OUT/determinism.tgz. Needs .devpkg/zoo.xz or zoo.gz.
#   device:  bash scripts/device-determinism.sh      (about 4 minutes on an H100)
#   here:    mkdir -p results/determinism && tar xzf <files_at>/determinism.tgz -C results/determinism \
#              && python3 scripts/determinism-compare.py results/determinism > results/determinism/summary.json
set -u
. "$(dirname "$0")/device-lib.sh"
zoo_binary || { echo "no zoo in .devpkg"; exit 1; }
rm -rf /tmp/det && mkdir -p /tmp/det
for i in 1 2; do
  for setting in sorted atomic deterministic; do
    case $setting in
      sorted) env=() ;;
      atomic) env=(ZOO_EMBEDDING_BWD=atomic) ;;
      deterministic) env=(ZOO_DETERMINISTIC=1) ;;
    esac
    step 120 "$setting-$i" env "${env[@]}" ZOO_CUDA_GRAPH=1 /tmp/zoo run configs/determinism.toml --device cuda:0 \
      --dtype bf16 --quiet --results-dir "/tmp/det/res-$setting-$i" --runs-dir "/tmp/det/runs-$setting-$i" > /dev/null
    mkdir -p "/tmp/det/pack/$setting-$i" && cp /tmp/det/res-"$setting-$i"/determinism/*.json "/tmp/det/pack/$setting-$i/"
  done
done
python3 scripts/determinism-compare.py /tmp/det/pack | tee "$OUT/summary.json"
tar czf "$OUT/determinism.tgz" -C /tmp/det/pack .
