#!/usr/bin/env bash
# Do an MQAR grid's mixers train through a CUDA graph (ZOO_CUDA_GRAPH=1) as they train eagerly?
# The kernels test (graph_replayed_steps_train_as_the_eager_steps) checks an attention LM only;
# this runs every variant of CONFIG (one width, one seed, one lr, STEPS steps) three times at once:
# eagerly twice (their own spread: the fused embedding backward adds atomically, in any order) and
# through a graph once, and compares the logged train and val losses. A variant passes when the
# graph run is within 3x the eager runs' own spread, or 1e-3 relative where they agree exactly, and
# the graph run's log says every run's steps replayed a graph. Exit status 1 if any check fails.
# usage: [ZOO=/tmp/zoo] scripts/device-graph-check.sh CONFIG [STEPS] [D_MODEL]
#   (DEVICE=cpu DTYPE=f32 runs the script's plumbing on the CPU, where no graph replays: a smoke test)
#   device:  run(command="bash scripts/device-graph-check.sh configs/mqar-2k.toml", carry=[".devpkg"])
set -u
cfg=$1; steps=${2:-60}; d=${3:-128}
zoo=${ZOO:-/tmp/zoo}
tmp=/tmp/graph-check; rm -rf "$tmp"; mkdir -p "$tmp"
sed -e 's/^experiment = .*/experiment = "graph-check"/' -e "s/^steps = .*/steps = $steps/" \
  -e "s/^eval_every = .*/eval_every = $((steps / 2))/" -e 's/^warmup_steps = .*/warmup_steps = 10/' \
  -e 's/^seeds = .*/seeds = [0]/' -e 's/^lrs = .*/lrs = [1e-3]/' -e "s/^\"model.d_model\" = .*/\"model.d_model\" = [$d]/" \
  "$cfg" > "$tmp/cfg.toml"
for r in eager1:0 eager2:0 graph:1; do
  name=${r%:*}
  ZOO_CUDA_GRAPH=${r#*:} "$zoo" run "$tmp/cfg.toml" --device "${DEVICE:-cuda:0}" --dtype "${DTYPE:-bf16}" -q \
    --results-dir "$tmp/$name" --runs-dir "$tmp/runs-$name" > "$tmp/$name.log" 2>&1 &
done
wait
echo "graph replays logged: $(grep -c 'replay a CUDA graph' "$tmp/graph.log"); not used: $(grep -c 'CUDA graph not used\|CUDA graph off' "$tmp/graph.log")"
grep 'CUDA graph not used\|CUDA graph off\|rror' "$tmp/graph.log" | sort | uniq -c | head
python3 - "$tmp" << 'EOF'
import json, glob, os, sys
tmp = sys.argv[1]
def curve(name, run):
    d = json.load(open(f"{tmp}/{name}/graph-check/{run}"))
    return [(p["step"], k, p[k]) for p in d["curve"] for k in ("train_loss", "val_loss") if p.get(k) is not None]
bad = 0
runs = sorted(os.path.basename(f) for f in glob.glob(f"{tmp}/graph/graph-check/*.json"))
if not runs:
    print("no graph run finished"); sys.exit(1)
print(f"{'run':55} {'eager spread':>12} {'graph - eager':>13}  verdict")
for run in runs:
    try:
        a, b, g = curve("eager1", run), curve("eager2", run), curve("graph", run)
    except FileNotFoundError as e:
        print(f"{run:55} missing: {e.filename}"); bad += 1; continue
    own = max(abs(x[2] - y[2]) for x, y in zip(a, b))
    diff = max(abs(x[2] - z[2]) for x, z in zip(a, g))
    scale = max(abs(x[2]) for x in a)
    ok = diff <= max(3 * own, 1e-3 * scale) and len(a) == len(g)
    bad += not ok
    print(f"{run[:-5]:55} {own:12.3g} {diff:13.3g}  {'ok' if ok else 'DIFFERS'}")
replays = open(f"{tmp}/graph.log").read().count("replay a CUDA graph")
if replays != len(runs):
    print(f"the graph run replayed a graph in {replays} of {len(runs)} runs"); bad += 1
sys.exit(1 if bad else 0)
EOF
