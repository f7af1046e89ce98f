#!/usr/bin/env bash
# One device call for the delta-scan kernel and RetNet's decay (issues 11 and 9):
#  1. the CUDA tests of zoo_kernels::delta_scan against its CPU form (.devpkg/tests, built with
#     ZOO_CUDA_TESTS="zoo-kernels:delta_scan" scripts/build-cuda.sh --tests);
#  2. A/B on a quiet GPU, same command: `zoo bench` of one MQAR training step (B 256, T 256, bf16)
#     of DeltaNet and Gated DeltaNet at d = 128 (mqar-2k runs 28 and 40) with .devpkg/zoo-old.gz
#     (a build without the kernel) and .devpkg/zoo.gz; JSONs into $OUT/bench.tgz;
#  3. configs/mqar-retnet-decay.toml through scripts/device-mqar.sh (POOL_BUDGET_S, POOL_STOP_S).
# usage: [POOL_BUDGET_S=240 POOL_STOP_S=290] scripts/device-delta.sh
set -u
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib
t0=$(date +%s)
bash scripts/device-tests.sh > "$OUT/tests.log" 2>&1; echo "tests exit $? after $(( $(date +%s) - t0 )) s"
grep -E "^test |test result" "$OUT/tests.log"
gunzip -c .devpkg/zoo-old.gz > /tmp/zoo-old && chmod +x /tmp/zoo-old
gunzip -c .devpkg/zoo.gz > /tmp/zoo && chmod +x /tmp/zoo
mkdir -p /tmp/bench
for idx in 28 40; do
  for bin in old new; do
    z=/tmp/zoo; [ $bin = old ] && z=/tmp/zoo-old
    "$z" bench configs/mqar-2k.toml --run-index $idx --seq-lens 256 --batch 256 --warmup 3 --iters 10 \
      --decode-tokens 4 --device cuda:0 --dtype bf16 --out /tmp/bench/mqar2k-run$idx-$bin.json > /dev/null 2>> "$OUT/bench.log" \
      || echo "bench $idx $bin failed"
  done
done
tar czf "$OUT/bench.tgz" -C /tmp/bench . && echo "bench done after $(( $(date +%s) - t0 )) s"
STOP_S=${POOL_STOP_S:-290} SHIP_CKPT=1 bash scripts/device-mqar.sh "${POOL_BUDGET_S:-240}" 3 configs/mqar-retnet-decay.toml
echo "all done after $(( $(date +%s) - t0 )) s"
