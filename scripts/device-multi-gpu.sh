#!/usr/bin/env bash
# Issue 16's checks on a machine with two or more GPUs (kind nvidia-h200-x2 or larger), in one
# device call; outputs in $OUT:
#   nccl.log         the NCCL tests (crates/core/tests/nccl.rs): one rank, and two ranks on two GPUs
#                    (parameters identical across ranks after training, equal to one GPU's)
#   dp-curve.json    the gated-attention baseline (configs/gated-attention.toml, seed 0, its 1000
#                    steps at global batch 32 x 256, bf16) trained on one GPU twice (the run-to-run
#                    spread) and on two GPUs through `zoo launch --gpus 2`: the val-loss curves and
#                    their largest differences
#   ddp-h200x2.json  scripts/ddp-bench.py: tokens/s of the 8L/512 model at T = 1024 on 1 and 2 GPUs
#                    (and 4, 8 if present), zoo against PyTorch DDP (target: zoo >= 1.8x at 2 GPUs)
# Build here: ZOO_DEVPKG=.devpkg-x2 ZOO_CUDA_TESTS="zoo-core:nccl" scripts/build-cuda.sh --tests
#   device:  run(command="bash scripts/device-multi-gpu.sh", kind="nvidia-h200-x2",
#                carry=[".devpkg-x2", "data/shakespeare.txt"], timeout_s=590)
#   here:    cp the JSONs into results/bench/ (ddp) and results/dp-curve/ (the curves)
set -u
. "$(dirname "$0")/device-lib.sh"
PKG=${ZOO_DEVPKG:-.devpkg-x2}
[ -x /tmp/zoo ] || { gunzip -c "$PKG/zoo.gz" > /tmp/zoo && chmod +x /tmp/zoo; }
out=${OUT:-/tmp/out}; mkdir -p "$out"
nvidia-smi -L
gunzip -c "$PKG/tests/nccl.gz" > /tmp/nccl && chmod +x /tmp/nccl
step 150 nccl-tests /tmp/nccl --test-threads 1 --nocapture > "$out/nccl.log" 2>&1
grep -E "^test |test result|skipped|differ|panicked" "$out/nccl.log" | head -20

# The baseline of configs/gated-attention.toml alone (seed 0): its model, data and training, and
# no sweep.
cfg=/tmp/dp-curve.toml
sed -e '/^\[sweep\]/,$d' -e 's/^experiment = .*/experiment = "dp-curve"/' configs/gated-attention.toml > $cfg
rm -rf /tmp/dp-1a /tmp/dp-1b /tmp/dp-2
step 120 one-gpu-a /tmp/zoo --device cuda:0 --dtype bf16 -q run $cfg --results-dir /tmp/dp-1a --runs-dir /tmp/dp-1a/runs
step 120 one-gpu-b /tmp/zoo --device cuda:0 --dtype bf16 -q run $cfg --results-dir /tmp/dp-1b --runs-dir /tmp/dp-1b/runs
step 120 two-gpus /tmp/zoo --device cuda --dtype bf16 -q launch --gpus 2 run $cfg --results-dir /tmp/dp-2 --runs-dir /tmp/dp-2/runs
python3 - "$out/dp-curve.json" <<'EOF'
import glob, json, sys
runs = {}
for name, d in [("one_gpu_a", "/tmp/dp-1a"), ("one_gpu_b", "/tmp/dp-1b"), ("two_gpus", "/tmp/dp-2")]:
    f = glob.glob(f"{d}/dp-curve/*.json")
    if f:
        j = json.load(open(f[0]))
        runs[name] = {"file": f[0], "curve": j["curve"], "metrics": j["metrics"], "throughput": j["throughput"],
                      "world_size": j["env"]["device"].get("world_size", 1), "git": j["env"]["git"]}
def val(r):
    return {p["step"]: p["val_loss"] for p in r["curve"] if p.get("val_loss") is not None}
res = {"schema": "zoo.dp-curve/1", "config": "configs/gated-attention.toml (baseline, seed 0)", "runs": runs}
if "one_gpu_a" in runs:
    a = val(runs["one_gpu_a"])
    for other in ("one_gpu_b", "two_gpus"):
        if other in runs:
            b = val(runs[other])
            common = sorted(set(a) & set(b))
            res[f"max_abs_val_loss_diff one_gpu_a/{other}"] = max(abs(a[s] - b[s]) for s in common) if common else None
json.dump(res, open(sys.argv[1], "w"), indent=1)
print({k: v for k, v in res.items() if k.startswith("max")})
EOF

step 240 ddp-bench python3 scripts/ddp-bench.py --zoo /tmp/zoo --out "$out/ddp-h200x2.json" > "$out/ddp.log" 2>&1
tail -5 "$out/ddp.log"
