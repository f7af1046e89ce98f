#!/usr/bin/env python3
"""The twin table (issue 11) from the JSON of scripts/twin-bench.py, as markdown: per model and
shape, train tokens/s and peak memory of zoo (fused kernels and compositions) and of the PyTorch
twins (transformers' LlamaForCausalLM with sdpa, the eager twin, the compiled twin), zoo's ratios
against HF and the compiled twin; prefill and decode beside HF; and, where the JSON has it, the
decode-alone section (T = 4096, B = 1 and 32) against the eager twin and HF with peak memory over
weights + KV cache. Every number is read from the JSON; nothing is typed in.

    python3 scripts/twin-table.py results/bench/twins-h200.json [more.json ...] > results/bench/twins-h200.md

Several JSONs (e.g. a full run and a decode-only run) are rendered one after another, each under
its own heading with its file name, device, versions and zoo build.
"""
import json
import os
import sys

def fmt_k(x):
    return "–" if x is None else (f"{x / 1e3:.0f}k" if x >= 1e4 else f"{x:.0f}")


def fmt_gb(x):
    return "–" if x is None else f"{x / 1e9:.1f} GB"


def ratio(a, b):
    return "–" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def cell_error(r, phase):
    e = (r or {}).get(f"{phase}_error") or (r or {}).get("error")
    if not e:
        return None
    return "OOM" if "out of memory" in e.lower() or "OUT_OF_MEMORY" in e else "error"


def zoo_build(d):
    for m in (d.get("models") or {}).values():
        for r in m.get("rows", []):
            if r.get("zoo_git"):
                return r["zoo_git"]
    for r in (d.get("decode") or {}).get("rows", []):
        if r.get("zoo_git"):
            return r["zoo_git"]
    return None


def render(path):
    d = json.load(open(path))
    out = [f"## {os.path.basename(path)}", ""]
    git = zoo_build(d)
    # Two forms: {"build": {"sha", "dirty"}, ...} (zoo's env record) or {"sha", "dirty", "source": "build"}.
    b = (git or {}).get("build", git)
    build = f"zoo build {b['sha'][:7]}{' (dirty)' if b.get('dirty') else ''}" if b and b.get("sha") else "zoo build unknown"
    out.append(f"{d.get('device', '?')}, {d.get('dtype', '?')}, torch {d.get('torch', '?')}, "
               f"transformers {d.get('transformers', '?')}, {build}. Protocol: see the JSON's `protocol`.")
    if d.get("complete") is False:
        out.append("**Incomplete run**: the bench stopped before its last section; what it measured is below.")
    out.append("")
    models = d.get("models") or {}
    if any(m.get("rows") for m in models.values()):
        out += ["| model | T × B | zoo fused: train tok/s, peak | zoo naive | HF (sdpa) | eager twin | compile twin "
                "| zoo / HF, / compile | memory / HF |", "|---|---|---|---|---|---|---|---|---|"]
        pre = ["| model | T × B | zoo prefill tok/s (/ HF) | HF prefill | zoo decode tok/s (/ HF), peak | HF decode, peak |",
               "|---|---|---|---|---|---|"]
        for name, m in models.items():
            shapes = sorted({(r["seq_len"], r["batch"]) for r in m["rows"]})
            for t, b in shapes:
                by = {r["impl"]: r for r in m["rows"] if (r["seq_len"], r["batch"]) == (t, b)}
                z, hf, cp = by.get("zoo-fused"), by.get("hf"), by.get("compile")
                g = lambda r, k: (r or {}).get(k)

                def tr(r):
                    return cell_error(r, "train") or fmt_k(g(r, "train_tokens_per_s"))
                zoo_cell = (f"{fmt_k(g(z, 'train_tokens_per_s'))}, {fmt_gb(g(z, 'train_peak_bytes'))}"
                            if g(z, "train_tokens_per_s") else cell_error(z, "train") or "–")
                naive = by.get("zoo-naive")
                naive_cell = (f"{fmt_k(g(naive, 'train_tokens_per_s'))}, {fmt_gb(g(naive, 'train_peak_bytes'))}"
                              if g(naive, "train_tokens_per_s") else cell_error(naive, "train") or "–")
                hf_cell = (f"{fmt_k(g(hf, 'train_tokens_per_s'))}, {fmt_gb(g(hf, 'train_peak_bytes'))}"
                           if g(hf, "train_tokens_per_s") else cell_error(hf, "train") or "–")
                out.append(f"| {name} | {t} × {b} | {zoo_cell} | {naive_cell} | {hf_cell} | {tr(by.get('eager'))} | {tr(cp)} "
                           f"| {ratio(g(z, 'train_tokens_per_s'), g(hf, 'train_tokens_per_s'))} / "
                           f"{ratio(g(z, 'train_tokens_per_s'), g(cp, 'train_tokens_per_s'))} "
                           f"| {ratio(g(z, 'train_peak_bytes'), g(hf, 'train_peak_bytes'))} |")
                pre.append(f"| {name} | {t} × {b} | {fmt_k(g(z, 'prefill_tokens_per_s'))} "
                           f"({ratio(g(z, 'prefill_tokens_per_s'), g(hf, 'prefill_tokens_per_s'))}×) "
                           f"| {fmt_k(g(hf, 'prefill_tokens_per_s'))} "
                           f"| {fmt_k(g(z, 'decode_tokens_per_s'))} ({ratio(g(z, 'decode_tokens_per_s'), g(hf, 'decode_tokens_per_s'))}×), "
                           f"{fmt_gb(g(z, 'decode_peak_bytes'))} "
                           f"| {fmt_k(g(hf, 'decode_tokens_per_s'))}, {fmt_gb(g(hf, 'decode_peak_bytes'))} |")
        out += [""] + pre + [""]
    dec = d.get("decode") or {}
    if dec.get("rows"):
        out += [f"Decode alone: {dec.get('model', '?')}, T = {dec.get('seq_len', '?')}, greedy.", "",
                "| B | impl | decode tok/s | / eager | / HF | peak | peak / (weights + KV) |", "|---|---|---|---|---|---|---|"]
        for b in sorted({r["batch"] for r in dec["rows"]}):
            by = {r["impl"]: r for r in dec["rows"] if r["batch"] == b}
            for impl in ["zoo-fused", "zoo-fused-split", "zoo-fused-split-fit", "eager", "hf"]:
                r = by.get(impl)
                if r is None:
                    continue
                tps = r.get("decode_tokens_per_s")
                if tps is None:
                    err = r.get("error") or r.get("decode_error") or "no result"
                    out.append(f"| {b} | {impl} | {'OOM' if 'out of memory' in err.lower() else 'did not run'} | – | – | – | – |")
                    continue
                rel = lambda o: ratio(tps, (by.get(o) or {}).get("decode_tokens_per_s")) if o != impl else "–"
                peak = r.get("peak_over_weights_kv")
                out.append(f"| {b} | {impl} | {tps:.0f} | {rel('eager')} | {rel('hf')} | {fmt_gb(r.get('decode_peak_bytes'))} "
                           f"| {'–' if peak is None else f'{peak:.2f}'} |")
        out.append("")
    return "\n".join(out)


def main():
    if len(sys.argv) < 2:
        sys.exit("usage: twin-table.py TWINS.json [more.json ...]")
    print("# PyTorch twins against zoo (scripts/twin-bench.py)\n")
    print("\n".join(render(p) for p in sys.argv[1:]))


if __name__ == "__main__":
    main()
