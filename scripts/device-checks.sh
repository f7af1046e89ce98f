#!/usr/bin/env bash
# The measurements that wait on the GPU (issues 11 and 14), by part, each step under its own time
# limit so one slow step cannot eat the call; outputs in $OUT:
# kernels:
#   tests.log          scripts/device-tests.sh (the default mma.sync attention kernels and the
#                      split-KV decoding kernel, flash_decode_op, against the composition, the CUDA
#                      softmax, and whatever else .devpkg/tests holds), then the flash tests again
#                      with ZOO_FLASH_MMA=0 (the WMMA kernels) and =2 (the ldmatrix mma.sync
#                      kernels, mma2)
#   attention-h200.json scripts/attention-bench.py (mma, WMMA and mma2 kernels beside SDPA), only if
#                      the flash tests passed
#                      (the fused tests include the CUDA-graph training test)
# decode:
#   decode-h200.json   decode alone at T = 4096, B = 1 and 32 with zoo's two decoding kernels
#                      (ZOO_FLASH_DECODE=split, the default since stop 36, and =rows) beside the eager twin and HF
#   graph-6L.json, graph-8L.json  `zoo bench --cuda-graph` of the 6L/384 twin model at 256 x 32 and
#                      the 8L/512 one at 1024 x 4: the train step and prefill as plain launches and
#                      as a replayed CUDA graph (or why the capture failed)
# twins:
#   twins-h200.json    scripts/twin-bench.py (issue 11's twin table, decode at T = 4096, B = 1 and 32)
# moe:
#   moe-graph.txt      the tiled MoE LM's curve trained eagerly and through a CUDA graph, side by side
#   profile-moe.txt    scripts/device-profile-moe.sh (where the E8 k2 step's time goes: step time,
#                      and ncu's GPU time by kernel; its CSVs are left out of $OUT, 8 files at most)
# moe512:
#   moe-cuda-512.tgz   scripts/moe-bench.sh on configs/moe-bench-512.toml (8 layers, d = 512, T = 512,
#                      B = 16; MOE_ROUNDS rounds, default 3; with --cuda-graph: the tiled variant's step replayed from a
#                      graph, the others' capture failing on their host read), the folder
#                      results/bench/moe-cuda-512
# profile:
#   profile-train.txt  scripts/device-profile-train.sh (ms per training step and ncu's GPU time by
#                      kernel at the twin shapes furthest from the targets: 6L/384 at 256 x 32,
#                      8L/512 at 4096 x 4)
# cudnn:
#   tests.log          the CUDA tests (scripts/device-tests.sh, default kernels), then the flash
#                      tests with ZOO_FLASH_CUDNN=1 (cuDNN's attention where it applies; the test
#                      fails if cuDNN ran on fewer than 4 of the 16-bit cases)
#   attention-h200.json scripts/attention-bench.py (mma, WMMA, mma2 and cuDNN through zoo's op beside
#                      SDPA), run even where a test failed (the output then says so first)
#   twins-cudnn.json   scripts/twin-bench.py with ZOO_FLASH_CUDNN=1: zoo (fused) against HF (TWIN_IMPLS:
#                      default zoo-fused,hf; add compile for the torch.compile twin) at the three training shapes, and decode at T = 4096, B = 32
#                      with both decoding kernels beside the eager twin and HF
#   graph-6L.json, graph-8L.json  with CUDNN_GRAPH=1: as decode's, with ZOO_FLASH_CUDNN=1
#   (CUDNN_TESTS=0 skips the tests, e.g. after device-mqar.sh WITH_TESTS=1 ran them; CUDNN_TWINS=0
#   the twins; CUDNN_BENCH=0 the attention bench)
#   ncu-cudnn.txt      with CUDNN_NCU=1: ncu's GPU time per kernel of the op's forward + backward
#                      through cuDNN at 1·16·4096·128
# moe-dispatch: stop 36's MoE changes, run in stop 37 (about 2 minutes):
#   tests.log          the CUDA test binaries .devpkg/tests/moe_dispatch and moe (zoo-kernels' gather
#                      kernels against the composition; zoo-moe's grouped_dispatch_equals_the_loop_on_cuda),
#                      from `ZOO_CUDA_TESTS="zoo-kernels:moe_dispatch zoo-moe:moe" scripts/build-cuda.sh --tests`
#   moe-dispatch.tgz   moe-bench.sh on configs/moe-bench-512.toml, dense and E8 k2 grouped, 3 rounds
#                      alternating without (plain/) and with (kernels/) ZOO_MOE_DISPATCH_KERNELS=1;
#                      medians printed
#   profile-cap-*.txt  zoo run's ms per step of the same two, ZOO_MOE_CAP_MULTIPLE unset (1) and 64
# decode-fit: the split-KV kernel with 8 rows a block (split) against rows fitted to a kv head's
#   (split-fit, ZOO_FLASH_DEC_ROWS=fit, the default since stop 37, when this ran; about 2 minutes):
#   tests-fit.log      the flash tests (.devpkg/tests/flash) under ZOO_FLASH_DEC_ROWS=fit
#   decode-fit.json    scripts/twin-bench.py decode alone at T = 4096, B = 1 and 32: split (8 rows a
#                      block) and split-fit beside the eager twin and HF
# all: kernels, decode, twins (more than one 600 s call).
#   device:  run(command="bash scripts/device-checks.sh kernels", carry=[".devpkg"], timeout_s=590)
#            run(command="bash scripts/device-checks.sh decode", carry=[".devpkg"], timeout_s=590)
#            run(command="bash scripts/device-checks.sh twins", carry=[".devpkg"], timeout_s=590)
#            run(command="bash scripts/device-checks.sh moe", carry=[".devpkg"], timeout_s=590)
#            run(command="bash scripts/device-checks.sh moe512", carry=[".devpkg"], timeout_s=590)
#            run(command="bash scripts/device-checks.sh profile", carry=[".devpkg"], timeout_s=590)
#   here:    cp the JSONs into results/bench/, then regenerate the twin table:
#            python3 scripts/twin-table.py results/bench/twins-h200.json > results/bench/twins-h200.md
#            tar xzf moe-cuda-512.tgz -C results/bench && zoo report results/bench/moe-cuda-512
set -u
. "$(dirname "$0")/device-lib.sh"
zoo_binary

kernels() {
  local flash_ok=1
  : > "$OUT/tests.log"
  kernel_tests "$OUT/tests.log" || flash_ok=0
  grep -E "^== |^test result|FAILED|panicked" "$OUT/tests.log" | head -20
  if [ "$flash_ok" = 1 ]; then
    step 120 attention-bench python3 scripts/attention-bench.py --zoo /tmp/zoo --out "$OUT/attention-h200.json" \
      > "$OUT/attention.log" 2>&1
    tail -3 "$OUT/attention.log"
  else
    echo "== attention-bench skipped: a test failed (see tests.log)"
  fi
}

decode() {
  # Decode alone, both decoding kernels (the split one's numbers mean nothing if its test failed).
  step 200 decode python3 scripts/twin-bench.py --zoo /tmp/zoo --impls none --decode-batches 1,32 \
    --zoo-decode-kernels rows,split --out "$OUT/decode-h200.json" > "$OUT/decode.log" 2>&1
  tail -12 "$OUT/decode.log"
  # The launches' cost: the same step captured into a CUDA graph and replayed.
  graph 6 384 6 256 32 6L
  graph 8 512 8 1024 4 8L
}

graph() { # layers d heads T B name
  baseline_at "$1" "$2" "$3" > /tmp/graph-$6.toml
  step 120 "graph $6" /tmp/zoo bench /tmp/graph-$6.toml --device cuda:0 --dtype bf16 --seq-lens "$4" --batch "$5" \
    --decode-tokens 0 --iters 10 --cuda-graph -q --out "$OUT/graph-$6.json" > /dev/null
  python3 -c "import json,sys; r=json.load(open(sys.argv[1]))['rows'][0]; print({k: v for k, v in r.items() if 'tokens_per_s' in k or 'error' in k})" "$OUT/graph-$6.json"
}

twins() {
  # The twin table (train, prefill, decode at the issue's shapes; decode alone at T = 4096, B = 1
  # and 32) with the default kernels.
  step 300 twins python3 scripts/twin-bench.py --zoo /tmp/zoo --out "$OUT/twins-h200.json" > "$OUT/twins.log" 2>&1
  tail -3 "$OUT/twins.log"
}

# The tiled MoE LM trained 40 steps eagerly and through a CUDA graph (ZOO_CUDA_GRAPH=1): the two
# curves (train and val loss, the aux loss, the load statistics) must agree within the fused
# kernels' run-to-run noise; $OUT/moe-graph.txt says how far apart they are.
moe_graph() {
  local i n
  n=$(/tmp/zoo run configs/moe-bench.toml --dry-run | grep -c "__")
  i=$(/tmp/zoo run configs/moe-bench.toml --dry-run | grep -n "^e8k2_tiled__" | cut -d: -f1); i=$((i - 1))
  sed -e 's/^steps = .*/steps = 40\nwarmup_steps = 2\neval_every = 20/' -e 's/^experiment = .*/experiment = "moe-graph"/' \
    -e 's/examples = 1 }/examples = 256 }/g' configs/moe-bench.toml > /tmp/moe-graph.toml
  for g in 0 1; do
    rm -rf /tmp/moe-graph-$g
    step 120 "moe-graph $g" env ZOO_CUDA_GRAPH=$g /tmp/zoo run /tmp/moe-graph.toml --device cuda:0 --dtype bf16 --shard $i/$n -q \
      --results-dir /tmp/moe-graph-$g --runs-dir /tmp/moe-graph-$g/runs > /dev/null 2>> "$OUT/moe-graph.txt"
  done
  python3 - "$OUT/moe-graph.txt" <<'PY'
import glob, json, sys
c = [json.load(open(glob.glob(f"/tmp/moe-graph-{g}/moe-graph/*.json")[0]))["curve"] for g in (0, 1)]
out = open(sys.argv[1], "a")
for a, b in zip(*c):
    line = f"step {a['step']}: train {a['train_loss']:.5f} / {b['train_loss']:.5f}, val {a['val_loss']:.5f} / {b['val_loss']:.5f}, aux {a.get('aux_loss')} / {b.get('aux_loss')}, stats equal keys: {sorted((a.get('stats') or [{}])[0]) == sorted((b.get('stats') or [{}])[0])}"
    print(line); out.write(line + "\n")
PY
}

moe() {
  moe_graph
  step 300 moe-profile env OUT=/tmp/moe-prof bash scripts/device-profile-moe.sh
  cp /tmp/moe-prof/profile-moe.txt "$OUT/" 2> /dev/null
}

moe512() {
  step 540 moe-bench-512 env ZOO=/tmp/zoo CFG=configs/moe-bench-512.toml T=512 OUT_DIR=/tmp/moe-512/moe-cuda-512 \
    bash scripts/moe-bench.sh cuda "${MOE_ROUNDS:-3}" --cuda-graph
  tar czf "$OUT/moe-cuda-512.tgz" -C /tmp/moe-512 moe-cuda-512
}

profile() {
  step 560 train-profile bash scripts/device-profile-train.sh
}

cudnn() {
  local ok=1
  # CUDNN_TESTS=0: the tests ran in an earlier call (device-mqar.sh WITH_TESTS=1 runs the same
  # cuDNN flash tests beside its pool), so this call only times.
  if [ "${CUDNN_TESTS:-1}" = 1 ]; then
    : > "$OUT/tests.log"
    step 120 tests bash scripts/device-tests.sh >> "$OUT/tests.log" 2>&1 || ok=0
    if [ -f /tmp/flash ]; then
      step 80 tests-cudnn env ZOO_FLASH_CUDNN=1 /tmp/flash --test-threads 1 --nocapture >> "$OUT/tests.log" 2>&1 || ok=0
    fi
    grep -E "^== |^test result|FAILED|panicked|cuDNN [0-9]+:|zoo-kernels:" "$OUT/tests.log" | head -30
  fi
  # The benches run either way (the call's time is spent): a failed test makes the numbers of
  # the kernels it covers meaningless, and the output says so first.
  [ "$ok" = 1 ] || echo "== A TEST FAILED (see tests.log): the benches' numbers for the failing kernels mean nothing"
  # CUDNN_BENCH=0: no attention bench (it ran in an earlier call).
  if [ "${CUDNN_BENCH:-1}" = 1 ]; then
    step 150 attention-bench python3 scripts/attention-bench.py --zoo /tmp/zoo --out "$OUT/attention-h200.json" \
      > "$OUT/attention.log" 2>&1
    tail -4 "$OUT/attention.log"
  fi
  # CUDNN_NCU=1: ncu's GPU time of every kernel of one forward + backward through cuDNN at
  # 1·16·4096·128 (`zoo bench-attention --iters 1`: its first 60 kernels are the fused op's three
  # forwards and three forwards + backwards), to tell cuDNN's own kernels from what the op and
  # candle's backward add around them (ncu-cudnn.txt).
  if [ "${CUDNN_NCU:-0}" = 1 ]; then
    step 120 ncu-cudnn env ZOO_FLASH_CUDNN=1 ncu --print-summary per-kernel --metrics gpu__time_duration.sum -c 60 \
      /tmp/zoo bench-attention --device cuda:0 --dtype bf16 --shapes 1:16:4096:128 --iters 1 > "$OUT/ncu-cudnn.txt" 2>&1
    grep -E "^  [A-Za-z_].*\(|gpu__time_duration.sum" "$OUT/ncu-cudnn.txt" | head -60
  fi
  # CUDNN_TWINS=0: the attention bench only (the call's time goes to other work).
  if [ "${CUDNN_TWINS:-1}" = 1 ]; then
    step 170 twins-cudnn env ZOO_FLASH_CUDNN=1 python3 scripts/twin-bench.py --zoo /tmp/zoo --impls "${TWIN_IMPLS:-zoo-fused,hf}" \
      --decode-batches 32 --zoo-decode-kernels rows,split --out "$OUT/twins-cudnn.json" > "$OUT/twins.log" 2>&1
    tail -30 "$OUT/twins.log"
  fi
  # CUDNN_GRAPH=1: the train step and prefill of the 6L/384 and 8L/512 models as plain launches
  # and replayed from a CUDA graph, with cuDNN's attention (graph-6L.json, graph-8L.json).
  if [ "${CUDNN_GRAPH:-0}" = 1 ]; then
    ( export ZOO_FLASH_CUDNN=1; graph 6 384 6 256 32 6L; graph 8 512 8 1024 4 8L )
  fi
}

decode_fit() {
  unpack_named flash /tmp/flash
  step 90 tests-fit env ZOO_FLASH_DEC_ROWS=fit /tmp/flash --test-threads 1 > "$OUT/tests-fit.log" 2>&1
  grep -E "^test |^test result|panicked" "$OUT/tests-fit.log"
  step 200 decode-fit python3 scripts/twin-bench.py --zoo /tmp/zoo --impls none --decode-batches 1,32 \
    --zoo-decode-kernels split,split-fit --out "$OUT/decode-fit.json" > "$OUT/decode-fit.log" 2>&1
  python3 -c "import json,sys; [print(r['impl'], r['batch'], round(r.get('decode_tokens_per_s', 0), 1), r.get('error', '')) for r in json.load(open(sys.argv[1]))['decode']['rows']]" "$OUT/decode-fit.json"
}

moe_dispatch() {
  : > "$OUT/tests.log"
  for t in moe_dispatch moe; do
    unpack_named "$t" /tmp/t-$t && step 60 "test $t" /tmp/t-$t --test-threads 1 >> "$OUT/tests.log" 2>&1
  done
  grep -E "on_cuda|^test result|panicked|FAILED" "$OUT/tests.log"
  for r in 1 2 3; do
    for mode in plain kernels; do
      k=0; [ "$mode" = kernels ] && k=1
      step 90 "bench $mode round $r" env ZOO_MOE_DISPATCH_KERNELS=$k ZOO=/tmp/zoo CFG=configs/moe-bench-512.toml T=512 \
        VARIANTS="dense_active e8k2_grouped" FIRST_ROUND=$r OUT_DIR=/tmp/moe-dispatch/$mode bash scripts/moe-bench.sh cuda 1 > /dev/null
    done
  done
  tar czf "$OUT/moe-dispatch.tgz" -C /tmp moe-dispatch
  python3 - <<'PY'
import glob, json, statistics
for mode in ("plain", "kernels"):
    for v in ("dense_active", "e8k2_grouped"):
        ms = [json.load(open(f))["rows"][0]["train_step_s"] * 1000 for f in glob.glob(f"/tmp/moe-dispatch/{mode}/{v}-r*.json")]
        if ms:
            print(f"{mode} {v}: train step median {statistics.median(ms):.2f} ms over {len(ms)} rounds ({min(ms):.2f}-{max(ms):.2f})")
PY
  for m in 1 64; do
    step 120 "profile cap $m" env ZOO_MOE_CAP_MULTIPLE=$m PART=1 CFG=configs/moe-bench-512.toml VARIANTS="dense_active e8k2_grouped" \
      OUT=/tmp/prof-cap-$m bash scripts/device-profile-moe.sh 50 > /dev/null
    cp /tmp/prof-cap-$m/profile-moe.txt "$OUT/profile-cap-$m.txt" && cat "$OUT/profile-cap-$m.txt"
  done
}

case "${1:-all}" in
  kernels) kernels ;;
  decode) decode ;;
  twins) twins ;;
  moe) moe ;;
  moe512) moe512 ;;
  profile) profile ;;
  cudnn) cudnn ;;
  moe-dispatch) moe_dispatch ;;
  decode-fit) decode_fit ;;
  all) kernels; decode; twins ;;
  *) echo "usage: $0 kernels|decode|twins|moe|moe512|profile|cudnn|moe-dispatch|decode-fit|all" >&2; exit 2 ;;
esac
