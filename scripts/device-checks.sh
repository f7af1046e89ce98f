#!/usr/bin/env bash
# One device call for the measurements that wait on the GPU (stop 25's list), each step under its
# own time limit so one slow step cannot eat the call; outputs in $OUT:
#   tests.log          scripts/device-tests.sh (the default mma.sync attention kernels against the
#                      composition, the CUDA softmax, and whatever else .devpkg/tests holds), then
#                      the flash tests again with ZOO_FLASH_MMA=0 (the WMMA kernels)
#   moe-cuda.tgz       scripts/moe-bench.sh cuda 3 (issue 14: E8 k2 vs dense, grouped vs looped)
#   twins-decode.json  scripts/twin-bench.py --impls none (issue 11: decode at T = 4096, B = 1 and 32)
#   attention-h200.json scripts/attention-bench.py (WMMA and mma.sync kernels beside SDPA), only if
#                      the flash tests passed
#   device:  run(command="bash scripts/device-checks.sh", carry=[".devpkg"], timeout_s=590)
#   here:    tar xzf <files_at>/moe-cuda.tgz -C results/bench; cp the JSONs into results/bench/
set -u
export LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib
[ -x /tmp/zoo ] || { gunzip -c .devpkg/zoo.gz > /tmp/zoo && chmod +x /tmp/zoo; }
step() { # seconds name command...
  local s=$1 name=$2; shift 2
  local t0=$SECONDS
  timeout "$s" "$@"; local rc=$?
  echo "== $name: rc $rc, $((SECONDS - t0)) s"
  return $rc
}
flash_ok=1
step 180 tests bash scripts/device-tests.sh > "$OUT/tests.log" 2>&1 || flash_ok=0
if [ -f /tmp/flash ]; then
  step 90 tests-wmma env ZOO_FLASH_MMA=0 /tmp/flash --test-threads 1 >> "$OUT/tests.log" 2>&1 || flash_ok=0
fi
grep -E "^== |^test result|FAILED|panicked" "$OUT/tests.log" | head -20
rm -rf results/bench/moe-cuda
step 120 moe-bench env ZOO=/tmp/zoo bash scripts/moe-bench.sh cuda 3 > "$OUT/moe-bench.log" 2>&1
(cd results/bench && tar czf "$OUT/moe-cuda.tgz" moe-cuda)
step 150 twin-decode python3 scripts/twin-bench.py --zoo /tmp/zoo --impls none --decode-batches 1,32 \
  --out "$OUT/twins-decode.json" > "$OUT/twins-decode.log" 2>&1
tail -3 "$OUT/twins-decode.log"
if [ "$flash_ok" = 1 ]; then
  step 120 attention-bench python3 scripts/attention-bench.py --zoo /tmp/zoo --out "$OUT/attention-h200.json" \
    > "$OUT/attention.log" 2>&1
  tail -3 "$OUT/attention.log"
else
  echo "== attention-bench skipped: a test failed (see tests.log)"
fi
