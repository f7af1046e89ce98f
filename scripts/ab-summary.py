#!/usr/bin/env python3
"""The ratios of a two-build comparison (scripts/ab-builds-bench.sh): for every model label found in
both OUT/<A>/ and OUT/<B>/ (files <label>-r<round>.json), the median over the rounds of the train
step, prefill, train peak and decode tokens/s, each build's range, and B's speed over A's, into OUT/summary.json
and as a markdown table on stdout.
usage: scripts/ab-summary.py OUT A B   (A, B: the two folder names, e.g. commits)"""
import glob
import json
import os
import re
import statistics
import sys


def rounds(folder):
    by = {}
    for path in sorted(glob.glob(os.path.join(folder, "*-r*.json"))):
        label = re.sub(r"-r\d+\.json$", "", os.path.basename(path))
        by.setdefault(label, []).append(json.load(open(path)))
    return by


def stats(benches, key):
    xs = [b["rows"][0][key] for b in benches if key in b["rows"][0]]
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)} if xs else None


def main():
    out, a, b = sys.argv[1:4]
    ra, rb = rounds(os.path.join(out, a)), rounds(os.path.join(out, b))
    models = {}
    for label in sorted(set(ra) & set(rb)):
        m = {}
        for key in ("train_step_s", "prefill_s", "train_peak_bytes"):
            sa, sb = stats(ra[label], key), stats(rb[label], key)
            if sa and sb:
                # Time and memory: lower is better, so A / B is B's gain.
                m[key] = {a: sa, b: sb, "a_over_b": sa["median"] / sb["median"]}
        sa, sb = stats(ra[label], "decode_tokens_per_s"), stats(rb[label], "decode_tokens_per_s")
        if sa and sb:
            # A rate: higher is better, so B / A is B's gain.
            m["decode_tokens_per_s"] = {a: sa, b: sb, "b_over_a": sb["median"] / sa["median"]}
        first = rb[label][0]
        m["shape"] = {"seq_len": first["rows"][0]["seq_len"], "batch": first["rows"][0]["batch"]}
        m["experiment"] = first["experiment"]
        models[label] = m
    env = next(iter(rb.values()))[0]["env"]
    summary = {
        "schema": "zoo.ab-summary/1",
        "a": a,
        "b": b,
        "device": f'{env["device"]["name"]} ({env["device"]["threads"]} threads), {env["dtype"]}',
        "what": "medians over the rounds of `zoo bench` (A and B alternating in every round); a_over_b > 1: B is faster / smaller",
        "models": models,
    }
    with open(os.path.join(out, "summary.json.tmp"), "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(os.path.join(out, "summary.json.tmp"), os.path.join(out, "summary.json"))
    print(f"| model (T × B) | train step {a} → {b} (ms) | speed-up | prefill (ms) | train peak (MiB) | decode (tok/s) | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for label, m in models.items():
        t, p, mem, dec = m.get("train_step_s"), m.get("prefill_s"), m.get("train_peak_bytes"), m.get("decode_tokens_per_s")
        cell = lambda s, k, f: f"{f(s[a][k])} → {f(s[b][k])}" if s else "–"
        ms = lambda x: f"{x * 1e3:.1f}"
        mib = lambda x: f"{x / 2**20:.0f}"
        rate = lambda x: f"{x:.1f}"
        gain = lambda s, k: f"{s[k]:.2f}×" if s else "–"
        print(f'| {label} ({m["shape"]["seq_len"]} × {m["shape"]["batch"]}) | {cell(t, "median", ms)} '
              f'| {gain(t, "a_over_b")} | {cell(p, "median", ms)} | {cell(mem, "median", mib)} '
              f'| {cell(dec, "median", rate)} | {gain(dec, "b_over_a")} |')


if __name__ == "__main__":
    main()
