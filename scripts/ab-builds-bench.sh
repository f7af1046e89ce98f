#!/usr/bin/env bash
# Two builds of zoo side by side on this machine, in one command: `zoo bench` train steps (and
# prefill) of the same models with binary A and binary B, alternating A, B for every model in
# every round, into OUT/<A's commit>/ and OUT/<B's commit>/ (<label>-r<round>.json), then
# `zoo report` of each folder, and B's ratios over A in OUT/summary.json (scripts/ab-summary.py). For what a change to the code buys, both binaries built the same
# way from clean commits (e.g. a git worktree per commit and one CARGO_TARGET_DIR, so that build
# settings are equal); each JSON records its binary's commit and whether the tree was dirty.
# Models (config:run index:T:batch:label): the 4L-256 and 6L-384 softmax LMs of
# scripts/twin-bench-cpu.py at its shapes (vocab 32768), and the quickstart's GLA and GLA +
# attention hybrid at d 128 (configs/quickstart.toml, T 64 x 32, as scripts/cpu-forms-bench.sh);
# each also decodes 16 tokens after its prefill. A label ending in -decode is decoding alone after
# a long prompt (the 6L-384 LM, T 4096 x B 1, 32 tokens; no train step).
# FIRST_ROUND=N numbers the rounds from N (more rounds into a folder that has some). BENCHES
# replaces the list (same config:run index:T:batch:label form, space-separated), e.g. the MoE
# bench's models: "configs/moe-bench.toml:0:128:16:dense configs/moe-bench.toml:1:128:16:e8k2".
# usage: [FIRST_ROUND=N] [BENCHES=...] scripts/ab-builds-bench.sh OUT ROUNDS ZOO_A ZOO_B
set -eu
out=$1; rounds=$2; za=$3; zb=$4
benches=${BENCHES:-"configs/bench-baseline-cpu.toml:0:256:8:4L-256 configs/bench-baseline-cpu-6l.toml:0:256:4:6L-384
configs/quickstart.toml:8:64:32:gla-d128 configs/quickstart.toml:11:64:32:hybrid-d128
configs/bench-baseline-cpu-6l.toml:0:4096:1:6L-384-decode"}
commit() { # the commit a binary was built at, from a tiny bench's JSON
  "$1" bench configs/bench-baseline-cpu.toml --seq-lens 8 --batch 1 --warmup 0 --iters 1 --decode-tokens 1 \
    --skip-train -q --out /tmp/ab-commit.json > /dev/null
  # The binary's own commit: env.git.build where the checkout is the same commit, else env.git.
  python3 -c "import json; g = json.load(open('/tmp/ab-commit.json'))['env']['git']; g = g.get('build', g); print(g['sha'][:7] + ('-dirty' if g['dirty'] else ''))"
}
ca=$(commit "$za"); cb=$(commit "$zb")
[ "$ca" != "$cb" ] || { echo "both binaries were built at $ca" >&2; exit 1; }
mkdir -p "$out/$ca" "$out/$cb"
echo "A = $ca, B = $cb; $rounds rounds"
first=${FIRST_ROUND:-1}
for r in $(seq "$first" $((first + rounds - 1))); do
  for e in $benches; do
    IFS=: read -r cfg i t b label <<< "$e"
    for side in "$za:$ca" "$zb:$cb"; do
      z=${side%%:*}; c=${side##*:}
      case $label in
        # Decoding alone after a long prefill: no train step, one prefill, 32 tokens.
        *-decode) how="--skip-train --warmup 1 --iters 1 --decode-tokens 32" ;;
        *) how="--warmup 2 --iters 6 --decode-tokens 16" ;;
      esac
      # shellcheck disable=SC2086
      "$z" bench "$cfg" --run-index "$i" --seq-lens "$t" --batch "$b" $how -q --out "$out/$c/$label-r$r.json" > /dev/null
      python3 -c "import json; z = json.load(open('$out/$c/$label-r$r.json'))['rows'][0]; print('round $r $label $c: train %s ms, prefill %.0f tok/s, decode %.1f tok/s' % ('%.1f' % (z['train_step_s'] * 1e3) if 'train_step_s' in z else '-', z['prefill_tokens_per_s'], z.get('decode_tokens_per_s', 0)))"
    done
  done
done
for c in "$ca" "$cb"; do "$zb" report "$out/$c" > /dev/null && echo "report: $out/$c/report.md"; done
# B over A per model, as JSON (OUT/summary.json) and a table.
python3 "$(dirname "$0")/ab-summary.py" "$out" "$ca" "$cb"
