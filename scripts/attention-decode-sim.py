"""A CPU check of the split-KV decoding kernels of attention.cu (dec_split, dec_combine) and of
their launch plan (`decode_plan` in crates/kernels/src/attention.rs), before they run on a GPU.

The kernels are emulated with their own index expressions: the plan's virtual columns (sink slots,
then the keys from c_lo that some query may see), one block per (split, batch x kv head, group of
R rows; R is 8, 4 at head dims >= 192, or with ZOO_FLASH_DEC_ROWS=fit the smallest power of two
that holds a kv head's rows: every case runs both ways), rows r = g * Tq + i of a kv head (query head hk * G + g, query i), the 4 warps taking the
chunk's keys u = first + warp, + 4, ..., lanes over the head dim (element j * 32 + lane), a
per-warp online softmax in base 2, the warps merged through "shared memory", the block's
unnormalised O and (max, sum) written to the workspaces at (split, row), and the combine merging
the splits into O and the LSE. K and V are read through (batch, head, row) strides of a longer
cache. Each case is compared, in float64, with numpy attention under the same mask (causal at
absolute positions, windows, sinks, GQA, several queries) and the LSE with log2 of the softmax
denominator. A mistyped index fails it (e.g. `col(u)` without the sinks' offset, or the combine
forgetting a split's 2^(m_s - M)), which the script checks by running its own mutations. It says
nothing about the GPU itself (races, launch limits, the asm): crates/core/tests/flash.rs
(`split_kv_decoding_matches_the_composition`) runs the kernels there.

    python3 scripts/attention-decode-sim.py        (numpy; a few seconds)
"""
import numpy as np

DEC_WARPS, MIN_CHUNK, LOG2E = 4, 64, 1.4426950408889634
FIT = False  # decode_plan's fit_rows (main runs every case both ways)
rng = np.random.default_rng(0)


def plan(b, h, hkv, tq, tk, d, q_start, k_start, n_sink, window, target):
    """decode_plan (attention.rs), line by line."""
    rows = h // hkv * tq
    most = 4 if d >= 192 else 8
    # ZOO_FLASH_DEC_ROWS=fit: the next power of two of the rows, capped; the default: always `most`.
    r = min(1 << (max(rows, 1) - 1).bit_length(), most) if FIT else most
    groups = -(-rows // r)
    keys = tk - n_sink
    qlo, qhi = q_start, q_start + tq - 1
    lo = max(0, qlo - window + 1 - k_start) if window else 0
    hi = min(qhi - k_start + 1, keys)
    n_cols = n_sink + max(hi - lo, 0)
    base = max(b * hkv * groups, 1)
    splits = min(max(-(-target // base), 1), max(n_cols // MIN_CHUNK, 1))
    chunk = -(-n_cols // splits)
    splits = 1 if chunk == 0 else -(-n_cols // chunk)
    return r, groups, n_sink + lo, n_cols, chunk, splits


def visible(qp, c, q_start, k_start, n_sink, window):
    if c < n_sink:
        return True
    kp = k_start + c - n_sink
    return kp <= qp and (window == 0 or qp - kp < window)


def kernels(q, kc, vc, tk, q_start, k_start, n_sink, window, scale, target, mutate=None):
    """dec_split then dec_combine. q (B, H, Tq, D); kc, vc caches (B, Hkv, cap, D), first tk rows used."""
    B, H, Tq, D = q.shape
    Hkv = kc.shape[1]
    G, E = H // Hkv, D // 32
    R, groups, c_lo, n_cols, chunk, splits = plan(B, H, Hkv, Tq, tk, D, q_start, k_start, n_sink, window, target)
    rows, total = G * Tq, B * H * Tq
    kflat, vflat = kc.reshape(-1), vc.reshape(-1)
    kb, kh, kr = kc.shape[1] * kc.shape[2] * D, kc.shape[2] * D, D  # the strides of the view
    qflat = q.reshape(-1)
    part_o = np.full((splits, total, D), np.nan)
    part_ml = np.full((splits, total, 2), np.nan)
    qscale = scale * LOG2E

    def col(u):
        if mutate == "col":
            return c_lo + u
        return u if u < n_sink else c_lo + u - n_sink

    for split in range(splits):
        for bk in range(B * Hkv):
            b, hk = bk // Hkv, bk % Hkv
            for z in range(groups):
                r0 = z * R
                # Per warp, per row: q (lanes x E, element j * 32 + lane), m, l, acc.
                live = [r0 + r < rows for r in range(R)]
                qr = np.zeros((R, D))
                qpos = [None] * R
                for r in range(R):
                    if live[r]:
                        rr = r0 + r
                        qr[r] = qflat[(bk * rows + rr) * D:(bk * rows + rr + 1) * D] * qscale
                        qpos[r] = q_start + rr % Tq
                m = np.full((DEC_WARPS, R), -np.inf)
                l = np.zeros((DEC_WARPS, R))
                acc = np.zeros((DEC_WARPS, R, D))
                u_end = min((split + 1) * chunk, n_cols)
                for warp in range(DEC_WARPS):
                    u = split * chunk + warp
                    while u < u_end:
                        c = col(u)
                        kbase, vbase = b * kb + hk * kh + c * kr, b * kb + hk * kh + c * kr
                        krow = np.array([kflat[kbase + j * 32 + lane] for j in range(E) for lane in range(32)])
                        vrow = np.array([vflat[vbase + j * 32 + lane] for j in range(E) for lane in range(32)])
                        order = np.array([j * 32 + lane for j in range(E) for lane in range(32)])
                        for r in range(R):
                            s = float(np.dot(qr[r][order], krow))  # the warp's lane sums, reduced
                            if qpos[r] is None or not visible(qpos[r], c, q_start, k_start, n_sink, window):
                                continue
                            mn = max(m[warp, r], s)
                            corr, pj = 2.0 ** (m[warp, r] - mn), 2.0 ** (s - mn)
                            l[warp, r] = l[warp, r] * corr + pj
                            acc[warp, r][order] = acc[warp, r][order] * corr + pj * vrow
                            m[warp, r] = mn
                        u += DEC_WARPS
                for r in range(R):
                    if r0 + r >= rows:
                        break
                    mx = m[:, r].max()
                    if mx != -np.inf:
                        f = 2.0 ** (m[:, r] - mx)
                        o, sm = (acc[:, r] * f[:, None]).sum(0), (l[:, r] * f).sum()
                    else:
                        o, sm = np.zeros(D), 0.0
                    row = bk * rows + r0 + r
                    part_o[split, row] = o
                    part_ml[split, row] = (mx, sm)
    assert not np.isnan(part_o).any(), "a (split, row) of the workspace was never written"
    out = np.zeros(total * D)
    lse = np.zeros(total)
    for row in range(total):
        ms = part_ml[:, row, 0]
        mx = ms.max()
        w = np.where(ms == -np.inf, 0.0, 2.0 ** (ms - mx)) if mx != -np.inf else np.zeros(splits)
        if mutate == "combine":
            w = np.ones(splits)
        sm = (part_ml[:, row, 1] * w).sum()
        inv = 1.0 / sm if sm > 0 else 0.0
        out[row * D:(row + 1) * D] = (part_o[:, row] * w[:, None]).sum(0) * inv if sm > 0 else 0.0
        lse[row] = mx + np.log2(sm) if sm > 0 else -np.inf
    return out.reshape(B, H, Tq, D), lse.reshape(B, H, Tq), splits


def reference(q, k, v, q_start, k_start, n_sink, window, scale):
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    out = np.zeros_like(q)
    lse = np.full((B, H, Tq), -np.inf)
    for b in range(B):
        for h in range(H):
            hk = h // (H // Hkv)
            for i in range(Tq):
                mask = np.array([visible(q_start + i, c, q_start, k_start, n_sink, window) for c in range(Tk)])
                if not mask.any():
                    continue
                s = (k[b, hk] @ q[b, h, i]) * scale * LOG2E
                s = np.where(mask, s, -np.inf)
                mx = s.max()
                p = 2.0 ** (s - mx)
                out[b, h, i] = p @ v[b, hk] / p.sum()
                lse[b, h, i] = mx + np.log2(p.sum())
    return out, lse


# (B, H, Hkv, Tq, keys after the sinks, D, q_start, k_start, sinks, window, target blocks)
CASES = [
    (1, 2, 2, 1, 1, 32, 0, 0, 0, 0, 528),
    (2, 4, 1, 1, 37, 64, 36, 0, 0, 0, 528),
    (1, 8, 2, 1, 37, 64, 36, 0, 2, 8, 528),
    (1, 8, 1, 1, 300, 32, 299, 0, 0, 100, 16),  # few target blocks: several keys per warp
    (1, 4, 2, 1, 700, 64, 699, 0, 0, 0, 64),
    (2, 4, 4, 3, 200, 96, 197, 0, 3, 0, 528),
    (1, 8, 1, 16, 150, 32, 134, 0, 0, 0, 528),  # 8 heads x 16 queries: 16 groups of 8 rows
    (1, 4, 2, 2, 300, 128, 250, 4, 1, 120, 528),
    (1, 2, 1, 1, 260, 192, 259, 0, 0, 0, 528),
    (2, 4, 2, 3, 200, 256, 197, 0, 2, 0, 40),
    (1, 4, 1, 1, 2000, 64, 1999, 0, 3, 500, 528),  # sinks in the first of several splits
    (1, 2, 2, 1, 40, 64, 50, 100, 2, 0, 528),  # only the sinks visible
    (1, 2, 2, 1, 40, 64, 50, 100, 0, 0, 528),  # nothing visible
]


def run(case, mutate=None):
    B, H, Hkv, Tq, keys, D, q_start, k_start, n_sink, window, target = case
    tk = n_sink + keys
    cap = tk + 5
    q = rng.standard_normal((B, H, Tq, D))
    kc = rng.standard_normal((B, Hkv, cap, D))
    vc = rng.standard_normal((B, Hkv, cap, D))
    scale = 1.0 / np.sqrt(D)
    o, lse, splits = kernels(q, kc, vc, tk, q_start, k_start, n_sink, window, scale, target, mutate)
    ro, rl = reference(q, kc[:, :, :tk], vc[:, :, :tk], q_start, k_start, n_sink, window, scale)
    eo = np.abs(o - ro).max()
    fin = np.isfinite(rl)
    el = np.abs(lse[fin] - rl[fin]).max() if fin.any() else 0.0
    assert (np.isfinite(lse) == fin).all(), "the LSE is -inf exactly where nothing is visible"
    return eo, el, splits


def main():
    global FIT
    for FIT in (False, True):
        for case in CASES:
            eo, el, splits = run(case)
            print(f"{case}{' fit' if FIT else ''}: {splits} splits, O error {eo:.1e}, LSE error {el:.1e}")
            assert eo < 1e-12 and el < 1e-12, case
    # The check fails when an index is wrong.
    for mutate, case in [("col", CASES[2]), ("combine", CASES[4])]:
        eo, el, _ = run(case, mutate)
        print(f"mutation {mutate}: O error {eo:.1e}, LSE error {el:.1e}")
        assert max(eo, el) > 1e-3, f"the mutation {mutate} went unnoticed"
    print("ok")


if __name__ == "__main__":
    main()
