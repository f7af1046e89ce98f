#!/usr/bin/env bash
# One device call for the measurements that wait on the GPU (issue 11's kernels and twins), each
# step under its own time limit so one slow step cannot eat the call; outputs in $OUT:
#   tests.log          scripts/device-tests.sh (the default mma.sync attention kernels against the
#                      composition, the CUDA softmax, and whatever else .devpkg/tests holds), then
#                      the flash tests again with ZOO_FLASH_MMA=0 (the WMMA kernels) and =2 (the
#                      ldmatrix mma.sync kernels, mma2)
#   attention-h200.json scripts/attention-bench.py (mma, WMMA and mma2 kernels beside SDPA), only if
#                      the flash tests passed
#                      (the flash tests include the split-KV decoding kernel's, flash_decode_op)
#   decode-h200.json   decode alone at T = 4096, B = 1 and 32 with zoo's two decoding kernels
#                      (ZOO_FLASH_DECODE=rows, the default, and =split) beside the eager twin and HF
#   twins-h200.json    scripts/twin-bench.py (issue 11's twin table, decode at T = 4096, B = 1 and 32)
# PART: kernels (tests, attention bench, decode), twins (the twin table), or all (both: may not fit
# one 600 s call; the steps' limits add up to 900 s).
#   device:  run(command="bash scripts/device-checks.sh kernels", carry=[".devpkg"], timeout_s=590)
#            run(command="bash scripts/device-checks.sh twins", carry=[".devpkg"], timeout_s=590)
#   here:    cp the JSONs into results/bench/, then regenerate the twin table:
#            python3 scripts/twin-table.py results/bench/twins-h200.json > results/bench/twins-h200.md
set -u
. "$(dirname "$0")/device-lib.sh"
[ -x /tmp/zoo ] || { gunzip -c .devpkg/zoo.gz > /tmp/zoo && chmod +x /tmp/zoo; }
part=${1:-all}
if [ "$part" != twins ]; then
flash_ok=1
step 180 tests bash scripts/device-tests.sh > "$OUT/tests.log" 2>&1 || flash_ok=0
if [ -f /tmp/flash ]; then
  step 90 tests-wmma env ZOO_FLASH_MMA=0 /tmp/flash --test-threads 1 >> "$OUT/tests.log" 2>&1 || flash_ok=0
  # mma2 is opt-in: its failure is reported (the bench's fused_mma2 numbers then mean nothing) but
  # does not hold back the bench of the default kernels.
  step 90 tests-mma2 env ZOO_FLASH_MMA=2 /tmp/flash --test-threads 1 >> "$OUT/tests.log" 2>&1
fi
grep -E "^== |^test result|FAILED|panicked" "$OUT/tests.log" | head -20
if [ "$flash_ok" = 1 ]; then
  step 120 attention-bench python3 scripts/attention-bench.py --zoo /tmp/zoo --out "$OUT/attention-h200.json" \
    > "$OUT/attention.log" 2>&1
  tail -3 "$OUT/attention.log"
else
  echo "== attention-bench skipped: a test failed (see tests.log)"
fi
# Decode alone, both decoding kernels (the split one's numbers mean nothing if its test failed).
step 150 decode python3 scripts/twin-bench.py --zoo /tmp/zoo --impls none --decode-batches 1,32 \
  --zoo-decode-kernels rows,split --out "$OUT/decode-h200.json" > "$OUT/decode.log" 2>&1
tail -12 "$OUT/decode.log"
fi
[ "$part" = kernels ] && exit 0
# The twin table (train, prefill, decode at the issue's shapes; decode alone at T = 4096, B = 1
# and 32) with the default kernels.
step 300 twins python3 scripts/twin-bench.py --zoo /tmp/zoo --out "$OUT/twins-h200.json" > "$OUT/twins.log" 2>&1
tail -3 "$OUT/twins.log"
