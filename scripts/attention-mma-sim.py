"""A CPU check of the index arithmetic of attention.cu's mma.sync kernels (fwd_mma, bwd_dq_mma,
bwd_dkv_mma): each is emulated lane by lane, with the kernel's index expressions, shared-memory
tiles with padded rows, warps in lockstep between barriers, and mma.m16n8k16 assembling its A, B
and C fragments as the PTX ISA lays them out (lane l: group g = l / 4, t = l % 4; A rows g, g + 8
and columns 2t, 2t + 1, 2t + 8, 2t + 9; B rows 2t, 2t + 1, 2t + 8, 2t + 9 of column g; C rows g,
g + 8, columns 2t, 2t + 1). Each case is compared, in float64, with numpy attention and its
gradients under the same masks (causal, windows, sinks, prefill offsets, GQA). The fragment loads
are emulated as the kernels issue them, `ldmatrix` (x4, x2, x2.trans) with the kernels' per-lane
row addresses, and each fragment is checked against the same one from plain 32/16-bit loads; the
ldmatrix rows are checked for 16-byte alignment and bank conflicts. The forward walks its key
tiles as mma2 does, double-buffered (and the dQ kernel likewise; the dK/dV kernel its query tiles,
LSEs and D_i, zero-filled past Tq as cp.async does) (tile t + 1 loaded into the other buffer before tile t is
computed; reading the wrong buffer gives O errors ~0.5). Tiles that the kernels run
without a mask (`tile_visible`) run without one here too, and the script asserts that each kernel
took that path at least once. A mistyped index fails it (e.g. reading V's next-but-one row gives O
errors ~1; dropping the window from `tile_visible` gives errors ~0.1 in the wide-window case). It cannot catch a misreading of
the fragment layouts themselves, nor anything about the GPU (alignment, shared-memory sizes, the
asm): crates/core/tests/flash.rs on the GPU does that.

    python3 scripts/attention-mma-sim.py        (numpy; about 20 s)
"""
import numpy as np

TC_WARPS, TC_BR, TC_BC, PAD = 4, 64, 64, 8
LOG2E = 1.4426950408889634
rng = np.random.default_rng(0)
lanes = np.arange(32)
G, T4 = lanes >> 2, lanes & 3


class P:
    pass


def visible(p, qp, c):
    if c < p.n_sink:
        return True
    kp = p.k_start + c - p.n_sink
    return kp <= qp and (p.window == 0 or qp - kp < p.window)


def key_range(p, qlo, qhi):
    lo = 0 if p.window == 0 else qlo - p.window + 1 - p.k_start
    hi = qhi - p.k_start + 1
    tk = p.Tk - p.n_sink
    lo, hi = max(lo, 0), min(hi, tk)
    return p.n_sink + lo, p.n_sink + max(hi, lo)


# Registers: a pair register is an array (32, 2) (lo, hi); an A fragment is 4 pairs, B 2 pairs;
# a C tile is (32, 4) floats.
def mma(c, a, b):
    A = np.zeros((16, 16)); B = np.zeros((16, 8))
    for l in range(32):
        g, t = l >> 2, l & 3
        for e in range(2):
            A[g, 2 * t + e] = a[0][l, e]; A[g + 8, 2 * t + e] = a[1][l, e]
            A[g, 2 * t + 8 + e] = a[2][l, e]; A[g + 8, 2 * t + 8 + e] = a[3][l, e]
            B[2 * t + e, g] = b[0][l, e]; B[2 * t + 8 + e, g] = b[1][l, e]
    Cm = A @ B
    out = c.copy()
    for l in range(32):
        g, t = l >> 2, l & 3
        out[l, 0] += Cm[g, 2 * t]; out[l, 1] += Cm[g, 2 * t + 1]
        out[l, 2] += Cm[g + 8, 2 * t]; out[l, 3] += Cm[g + 8, 2 * t + 1]
    return out


def ld32(mem, idx):  # idx: (32,) element offsets
    return np.stack([mem[idx], mem[idx + 1]], 1)


def pack2(a, b):
    return np.stack([a, b], 1)


def load_rows_ld(dst, src, first, n, limit, D, LD):
    for r in range(n):
        dst[r * LD:r * LD + D] = src[(first + r) * D:(first + r) * D + D] if first + r < limit else 0


def kv_tiles(p, kb, vb, c_lo, c_hi, D, LD):
    """attention.cu's KvTiles (the forward and dQ kernels) as mma2 runs it: the sink slots, then the
    keys [c_lo, c_hi), in tiles of 64; K and V double-buffered, tile t + 1 loaded into buffer
    (t + 1) % 2 before tile t is computed from buffer t % 2. Yields (c0, to, K tile, V tile)."""
    n_sink_tiles = (p.n_sink + TC_BC - 1) // TC_BC
    n = n_sink_tiles + (c_hi - c_lo + TC_BC - 1) // TC_BC

    def at(t):
        return (t * TC_BC, p.n_sink) if t < n_sink_tiles else (c_lo + (t - n_sink_tiles) * TC_BC, c_hi)

    kbuf = [np.zeros(TC_BC * LD), np.zeros(TC_BC * LD)]; vbuf = [np.zeros(TC_BC * LD), np.zeros(TC_BC * LD)]

    def copy(t):
        c0, to = at(t)
        load_rows_ld(kbuf[t & 1], kb, c0, TC_BC, to, D, LD); load_rows_ld(vbuf[t & 1], vb, c0, TC_BC, to, D, LD)

    if n > 0:
        copy(0)
    for t in range(n):
        if t + 1 < n:
            copy(t + 1)
        yield (*at(t), kbuf[t & 1], vbuf[t & 1])


def fwd_mma(q, k, v, p, D):
    LD = D + PAD; NT = TC_BC // 8; DT = D // 8
    o = np.zeros(p.B * p.H * p.Tq * D); lse = np.zeros(p.B * p.H * p.Tq)
    for by in range(p.B * p.H):
        for bx in range((p.Tq + TC_BR - 1) // TC_BR):
            qs = np.zeros(TC_BR * LD); ks = np.zeros(TC_BC * LD); vs = np.zeros(TC_BC * LD)
            bh = by; b = bh // p.H; h = bh % p.H; hk = h // (p.H // p.Hkv)
            i0 = bx * TC_BR
            kb = k[(b * p.Hkv + hk) * p.Tk * D:]; vb = v[(b * p.Hkv + hk) * p.Tk * D:]
            load_rows_ld(qs, q[bh * p.Tq * D:], i0, TC_BR, p.Tq, D, LD)
            qlo = p.q_start + i0; qhi = min(qlo + TC_BR, p.q_start + p.Tq) - 1
            c_lo, c_hi = key_range(p, qlo, qhi)
            # warps run in lockstep between barriers: process tile by tile, warp by warp
            st = {}
            for w in range(TC_WARPS):
                qw = w * 16 * LD
                qa = [load_a(qs, w * 16, kk * 16, LD) for kk in range(D // 16)]
                st[w] = dict(qa=qa, oacc=[np.zeros((32, 4)) for _ in range(DT)], m0=np.full(32, -np.inf),
                             m1=np.full(32, -np.inf), l0=np.zeros(32), l1=np.zeros(32))
            for c0, to, ks, vs in kv_tiles(p, kb, vb, c_lo, c_hi, D, LD):
                for w in range(TC_WARPS):
                    S = st[w]
                    r0 = i0 + w * 16 + G; r1 = r0 + 8
                    sc = p.scale * LOG2E
                    s = [np.zeros((32, 4)) for _ in range(NT)]
                    for j in range(NT):
                        for kk in range(D // 16):
                            s[j] = mma(s[j], S['qa'][kk], load_b_cols(ks, j * 8, kk * 16, LD))
                    mx0, mx1 = S['m0'].copy(), S['m1'].copy()
                    full = tile_visible(p, i0 + w * 16, i0 + w * 16 + 16, c0, c0 + TC_BC, to)
                    FULL["fwd"] += full
                    for j in range(NT):
                        for e in range(2):
                            if full:
                                s[j][:, e] *= sc; s[j][:, 2 + e] *= sc
                            for l in range(32 if not full else 0):
                                c = c0 + j * 8 + 2 * T4[l] + e
                                inn = c < to
                                s[j][l, e] = s[j][l, e] * sc if (r0[l] < p.Tq and inn and visible(p, p.q_start + r0[l], c)) else -np.inf
                                s[j][l, 2 + e] = s[j][l, 2 + e] * sc if (r1[l] < p.Tq and inn and visible(p, p.q_start + r1[l], c)) else -np.inf
                            mx0 = np.maximum(mx0, s[j][:, e]); mx1 = np.maximum(mx1, s[j][:, 2 + e])
                    for x in (1, 2):
                        mx0 = np.maximum(mx0, mx0[lanes ^ x]); mx1 = np.maximum(mx1, mx1[lanes ^ x])
                    with np.errstate(invalid='ignore'):
                        corr0 = np.where(mx0 == -np.inf, 1.0, np.exp2(S['m0'] - mx0))
                        corr1 = np.where(mx1 == -np.inf, 1.0, np.exp2(S['m1'] - mx1))
                    sum0 = np.zeros(32); sum1 = np.zeros(32)
                    for j in range(NT):
                        for e in range(2):
                            with np.errstate(invalid='ignore'):
                                s[j][:, e] = np.where(mx0 == -np.inf, 0.0, np.exp2(s[j][:, e] - mx0))
                                s[j][:, 2 + e] = np.where(mx1 == -np.inf, 0.0, np.exp2(s[j][:, 2 + e] - mx1))
                            sum0 += s[j][:, e]; sum1 += s[j][:, 2 + e]
                    for x in (1, 2):
                        sum0 = sum0 + sum0[lanes ^ x]; sum1 = sum1 + sum1[lanes ^ x]
                    S['l0'] = S['l0'] * corr0 + sum0; S['l1'] = S['l1'] * corr1 + sum1
                    S['m0'], S['m1'] = mx0, mx1
                    for jd in range(DT):
                        S['oacc'][jd][:, 0] *= corr0; S['oacc'][jd][:, 1] *= corr0
                        S['oacc'][jd][:, 2] *= corr1; S['oacc'][jd][:, 3] *= corr1
                    for kk2 in range(TC_BC // 16):
                        pa = acc_to_a(s[2 * kk2], s[2 * kk2 + 1])
                        for jd in range(DT):
                            S['oacc'][jd] = mma(S['oacc'][jd], pa, load_b_rows(vs, kk2 * 16, jd * 8, LD))
            for w in range(TC_WARPS):
                S = st[w]
                r0 = i0 + w * 16 + G; r1 = r0 + 8
                inv0 = np.where(S['l0'] > 0, 1 / np.maximum(S['l0'], 1e-300), 0); inv1 = np.where(S['l1'] > 0, 1 / np.maximum(S['l1'], 1e-300), 0)
                for jd in range(DT):
                    col = jd * 8 + 2 * T4
                    for l in range(32):
                        if r0[l] < p.Tq:
                            base = (bh * p.Tq + r0[l]) * D + col[l]
                            o[base] = S['oacc'][jd][l, 0] * inv0[l]; o[base + 1] = S['oacc'][jd][l, 1] * inv0[l]
                        if r1[l] < p.Tq:
                            base = (bh * p.Tq + r1[l]) * D + col[l]
                            o[base] = S['oacc'][jd][l, 2] * inv1[l]; o[base + 1] = S['oacc'][jd][l, 3] * inv1[l]
                for l in range(32):
                    if T4[l] == 0:
                        if r0[l] < p.Tq:
                            lse[bh * p.Tq + r0[l]] = S['m0'][l] + np.log2(S['l0'][l]) if S['l0'][l] > 0 else -np.inf
                        if r1[l] < p.Tq:
                            lse[bh * p.Tq + r1[l]] = S['m1'][l] + np.log2(S['l1'][l]) if S['l1'][l] > 0 else -np.inf
    return o, lse


def reference(q, k, v, dout, p, D):
    q = q.reshape(p.B, p.H, p.Tq, D); k = k.reshape(p.B, p.Hkv, p.Tk, D); v = v.reshape(p.B, p.Hkv, p.Tk, D)
    dout = dout.reshape(p.B, p.H, p.Tq, D)
    grp = p.H // p.Hkv
    O = np.zeros_like(q); L = np.zeros((p.B, p.H, p.Tq)); dQ = np.zeros_like(q); dK = np.zeros_like(k); dV = np.zeros_like(v)
    for b in range(p.B):
        for h in range(p.H):
            hk = h // grp
            s = q[b, h] @ k[b, hk].T * p.scale
            mask = np.array([[visible(p, p.q_start + i, c) for c in range(p.Tk)] for i in range(p.Tq)])
            s = np.where(mask, s, -np.inf)
            m = s.max(1, keepdims=True)
            e = np.where(mask, np.exp(s - np.where(np.isfinite(m), m, 0)), 0)
            l = e.sum(1, keepdims=True)
            P_ = np.where(l > 0, e / np.maximum(l, 1e-300), 0)
            O[b, h] = P_ @ v[b, hk]
            L[b, h] = np.where(l[:, 0] > 0, (m[:, 0] + np.log(np.maximum(l[:, 0], 1e-300))) * LOG2E, -np.inf)
            dP = dout[b, h] @ v[b, hk].T
            Di = (dout[b, h] * O[b, h]).sum(1, keepdims=True)
            dS = P_ * (dP - Di)
            dQ[b, h] = dS @ k[b, hk] * p.scale
            dK[b, hk] += dS.T @ q[b, h] * p.scale
            dV[b, hk] += P_.T @ dout[b, h]
    return O.ravel(), L.ravel(), dQ.ravel(), dK.ravel(), dV.ravel()


def bwd_dq_mma(q, k, v, dout, lse, dlt, p, D):
    LD = D + PAD; NT = TC_BC // 8; DT = D // 8
    dq = np.zeros(p.B * p.H * p.Tq * D)
    for bh in range(p.B * p.H):
        for bx in range((p.Tq + TC_BR - 1) // TC_BR):
            qs = np.zeros(TC_BR * LD); dos = np.zeros(TC_BR * LD); ks = np.zeros(TC_BC * LD); vs = np.zeros(TC_BC * LD)
            b = bh // p.H; h = bh % p.H; hk = h // (p.H // p.Hkv); i0 = bx * TC_BR
            load_rows_ld(qs, q[bh * p.Tq * D:], i0, TC_BR, p.Tq, D, LD); load_rows_ld(dos, dout[bh * p.Tq * D:], i0, TC_BR, p.Tq, D, LD)
            lq = np.array([lse[bh * p.Tq + i0 + e] if i0 + e < p.Tq else -np.inf for e in range(TC_BR)])
            dlq = np.array([dlt[bh * p.Tq + i0 + e] if i0 + e < p.Tq else 0 for e in range(TC_BR)])
            kb = k[(b * p.Hkv + hk) * p.Tk * D:]; vb = v[(b * p.Hkv + hk) * p.Tk * D:]
            dqa = {w: [np.zeros((32, 4)) for _ in range(DT)] for w in range(TC_WARPS)}
            sc = p.scale * LOG2E
            qlo = p.q_start + i0; qhi = min(qlo + TC_BR, p.q_start + p.Tq) - 1
            c_lo, c_hi = key_range(p, qlo, qhi)
            for c0, to, ks, vs in kv_tiles(p, kb, vb, c_lo, c_hi, D, LD):
                for w in range(TC_WARPS):
                    qr = w * 16; r0 = i0 + qr + G; r1 = r0 + 8
                    L0, L1, D0, D1 = lq[qr + G], lq[qr + G + 8], dlq[qr + G], dlq[qr + G + 8]
                    s = [np.zeros((32, 4)) for _ in range(NT)]; dp = [np.zeros((32, 4)) for _ in range(NT)]
                    for kk in range(D // 16):
                        qa = load_a(qs, qr, kk * 16, LD); oa = load_a(dos, qr, kk * 16, LD)
                        for j in range(NT):
                            s[j] = mma(s[j], qa, load_b_cols(ks, j * 8, kk * 16, LD))
                            dp[j] = mma(dp[j], oa, load_b_cols(vs, j * 8, kk * 16, LD))
                    full = tile_visible(p, i0 + qr, i0 + qr + 16, c0, c0 + TC_BC, to)
                    FULL["dq"] += full
                    for j in range(NT):
                        for e in range(4):
                            for l in range(32):
                                cc = c0 + j * 8 + 2 * T4[l] + (e & 1)
                                row1 = e >= 2
                                i = r1[l] if row1 else r0[l]
                                L = L1[l] if row1 else L0[l]; Di = D1[l] if row1 else D0[l]
                                ok = full or (i < p.Tq and cc < to and L != -np.inf and visible(p, p.q_start + i, cc))
                                pv = np.exp2(s[j][l, e] * sc - L) if ok else 0.0
                                dp[j][l, e] = pv * (dp[j][l, e] - Di)
                    for kk2 in range(TC_BC // 16):
                        da = acc_to_a(dp[2 * kk2], dp[2 * kk2 + 1])
                        for jd in range(DT):
                            dqa[w][jd] = mma(dqa[w][jd], da, load_b_rows(ks, kk2 * 16, jd * 8, LD))
            for w in range(TC_WARPS):
                qr = w * 16; r0 = i0 + qr + G; r1 = r0 + 8
                for jd in range(DT):
                    col = jd * 8 + 2 * T4
                    for l in range(32):
                        if r0[l] < p.Tq:
                            base = (bh * p.Tq + r0[l]) * D + col[l]; dq[base] = dqa[w][jd][l, 0] * p.scale; dq[base + 1] = dqa[w][jd][l, 1] * p.scale
                        if r1[l] < p.Tq:
                            base = (bh * p.Tq + r1[l]) * D + col[l]; dq[base] = dqa[w][jd][l, 2] * p.scale; dq[base + 1] = dqa[w][jd][l, 3] * p.scale
    return dq


def ldmatrix(mem, addr, n, trans):
    """ldmatrix.sync.aligned.m8n8.x{n}(.trans).b16: lane 8 i + r gives the element offset of row r of
    matrix i (addr, (32,)); lane l receives, of matrix i, row l // 4 and columns 2 (l % 4) + {0, 1}
    (.trans: rows 2 (l % 4) + {0, 1} of column l // 4). Also checks what the GPU needs: 16-byte
    aligned rows (tiles start at offset 0 here) and the 8 rows of a matrix in distinct 4-bank groups
    (no bank conflicts)."""
    out = []
    for i in range(n):
        rows = addr[8 * i:8 * i + 8]
        assert np.all(rows % 8 == 0), "ldmatrix row address not 16-byte aligned"
        banks = np.concatenate([(r // 2 + np.arange(4)) % 32 for r in rows])
        assert len(set(banks.tolist())) == 32, "ldmatrix rows share banks"
        if trans:
            out.append(np.stack([mem[rows[2 * T4] + G], mem[rows[2 * T4 + 1] + G]], 1))
        else:
            out.append(np.stack([mem[rows[G] + 2 * T4], mem[rows[G] + 2 * T4 + 1]], 1))
    return out


# The fragment loads of attention.cu with ZOO_LDMATRIX (ldmatrix, the kernels' address expressions),
# each checked against the same fragment from 32- and 16-bit loads (ZOO_LDMATRIX=0).
def load_a(mem, r, c, LD):
    a = ldmatrix(mem, (r + (lanes & 7) + ((lanes >> 3) & 1) * 8) * LD + c + (lanes >> 4) * 8, 4, False)
    ref = [ld32(mem, (r + G) * LD + c + 2 * T4), ld32(mem, (r + G + 8) * LD + c + 2 * T4),
           ld32(mem, (r + G) * LD + c + 8 + 2 * T4), ld32(mem, (r + G + 8) * LD + c + 8 + 2 * T4)]
    assert all(np.array_equal(x, y) for x, y in zip(a, ref)), "load_a: ldmatrix fragment differs"
    return a


def acc_to_a(lo, hi):
    return [pack2(lo[:, 0], lo[:, 1]), pack2(lo[:, 2], lo[:, 3]), pack2(hi[:, 0], hi[:, 1]), pack2(hi[:, 2], hi[:, 3])]


def load_b_rows(mem, r, n0, LD):
    b = ldmatrix(mem, (r + (lanes & 7) + ((lanes >> 3) & 1) * 8) * LD + n0, 2, True)
    x = (r + 2 * T4) * LD + n0 + G
    ref = [pack2(mem[x], mem[x + LD]), pack2(mem[x + 8 * LD], mem[x + 9 * LD])]
    assert all(np.array_equal(u, w) for u, w in zip(b, ref)), "load_b_rows: ldmatrix fragment differs"
    return b


def load_b_cols(mem, n0, c, LD):
    b = ldmatrix(mem, (n0 + (lanes & 7)) * LD + c + ((lanes >> 3) & 1) * 8, 2, False)
    x = (n0 + G) * LD + c + 2 * T4
    ref = [ld32(mem, x), ld32(mem, x + 8)]
    assert all(np.array_equal(u, w) for u, w in zip(b, ref)), "load_b_cols: ldmatrix fragment differs"
    return b


def tile_visible(p, i_a, i_b, c_a, c_b, c_limit):
    if i_b > p.Tq or c_b > c_limit:
        return False
    if c_b <= p.n_sink:
        return True
    if c_a < p.n_sink:
        return False
    kp_lo = p.k_start + c_a - p.n_sink; kp_hi = p.k_start + c_b - 1 - p.n_sink
    qp_lo = p.q_start + i_a; qp_hi = p.q_start + i_b - 1
    return kp_hi <= qp_lo and (p.window == 0 or qp_hi - kp_lo < p.window)


FULL = {"fwd": 0, "dq": 0, "dkv": 0}  # tiles that skipped the mask, per kernel


def bwd_dkv_mma(q, k, v, dout, lse, dlt, p, D):
    LD = D + PAD; QH = 32; NQ = QH // 8; DT = D // 8
    dk = np.zeros(p.B * p.Hkv * p.Tk * D); dv = np.zeros_like(dk)
    for bk in range(p.B * p.Hkv):
        for bx in range((p.Tk + TC_BC - 1) // TC_BC):
            ks = np.zeros(TC_BC * LD); vs = np.zeros(TC_BC * LD); qs = np.zeros(TC_BR * LD); dos = np.zeros(TC_BR * LD)
            b = bk // p.Hkv; hk = bk % p.Hkv; group = p.H // p.Hkv; c0 = bx * TC_BC
            load_rows_ld(ks, k[bk * p.Tk * D:], c0, TC_BC, p.Tk, D, LD); load_rows_ld(vs, v[bk * p.Tk * D:], c0, TC_BC, p.Tk, D, LD)
            dka = {w: [np.zeros((32, 4)) for _ in range(DT)] for w in range(TC_WARPS)}
            dva = {w: [np.zeros((32, 4)) for _ in range(DT)] for w in range(TC_WARPS)}
            sc = p.scale * LOG2E
            c_last = min(c0 + TC_BC, p.Tk) - 1
            i_lo, i_hi = 0, p.Tq
            if c0 >= p.n_sink:
                kp_lo = p.k_start + c0 - p.n_sink; kp_hi = p.k_start + c_last - p.n_sink
                i_lo = max(kp_lo - p.q_start, 0)
                if p.window != 0:
                    i_hi = min(p.Tq, kp_hi + p.window - p.q_start)
                i_hi = max(i_hi, i_lo)
            # mma2's flat query-tile sequence (head u // n_q, rows i_lo + (u % n_q) * 64), Q, dO, the
            # LSEs and D_i double-buffered; rows at or beyond Tq arrive as zeros (cp.async zero-fill).
            n_q = (i_hi - i_lo + TC_BR - 1) // TC_BR
            n_tiles = group * n_q

            def qtile(u):
                return b * p.H + hk * group + u // n_q, i_lo + (u % n_q) * TC_BR

            qbuf = [np.zeros(TC_BR * LD), np.zeros(TC_BR * LD)]; obuf = [np.zeros(TC_BR * LD), np.zeros(TC_BR * LD)]
            lbuf = [None, None]; dbuf = [None, None]

            def issue(u, nb):
                bh, i0 = qtile(u)
                load_rows_ld(qbuf[nb], q[bh * p.Tq * D:], i0, TC_BR, p.Tq, D, LD); load_rows_ld(obuf[nb], dout[bh * p.Tq * D:], i0, TC_BR, p.Tq, D, LD)
                lbuf[nb] = np.array([lse[bh * p.Tq + i0 + e] if i0 + e < p.Tq else 0.0 for e in range(TC_BR)])
                dbuf[nb] = np.array([dlt[bh * p.Tq + i0 + e] if i0 + e < p.Tq else 0.0 for e in range(TC_BR)])

            if n_tiles > 0:
                issue(0, 0)
            for u in range(n_tiles):
                bh, i0 = qtile(u)
                if u + 1 < n_tiles:
                    issue(u + 1, (u + 1) & 1)
                qs, dos, ls, dl = qbuf[u & 1], obuf[u & 1], lbuf[u & 1], dbuf[u & 1]
                for w in range(TC_WARPS):
                    kr = w * 16; ck0 = c0 + kr + G; ck1 = ck0 + 8
                    for hq in range(TC_BR // QH):
                        qc = hq * QH
                        s = [np.zeros((32, 4)) for _ in range(NQ)]; dp = [np.zeros((32, 4)) for _ in range(NQ)]
                        for kk in range(D // 16):
                            ka = load_a(ks, kr, kk * 16, LD); va = load_a(vs, kr, kk * 16, LD)
                            for j in range(NQ):
                                s[j] = mma(s[j], ka, load_b_cols(qs, qc + j * 8, kk * 16, LD))
                                dp[j] = mma(dp[j], va, load_b_cols(dos, qc + j * 8, kk * 16, LD))
                        full = tile_visible(p, i0 + qc, i0 + qc + QH, c0 + kr, c0 + kr + 16, p.Tk)
                        FULL["dkv"] += full
                        for j in range(NQ):
                            for e in range(4):
                                for l in range(32):
                                    jq = qc + j * 8 + 2 * T4[l] + (e & 1); i = i0 + jq; c = ck0[l] if e < 2 else ck1[l]
                                    L = ls[jq]
                                    ok = full or (c < p.Tk and i < p.Tq and L != -np.inf and visible(p, p.q_start + i, c))
                                    pv = np.exp2(s[j][l, e] * sc - L) if ok else 0.0
                                    s[j][l, e] = pv; dp[j][l, e] = pv * (dp[j][l, e] - dl[jq])
                        for kk2 in range(QH // 16):
                            pa = acc_to_a(s[2 * kk2], s[2 * kk2 + 1]); da = acc_to_a(dp[2 * kk2], dp[2 * kk2 + 1])
                            for jd in range(DT):
                                dva[w][jd] = mma(dva[w][jd], pa, load_b_rows(dos, qc + kk2 * 16, jd * 8, LD))
                                dka[w][jd] = mma(dka[w][jd], da, load_b_rows(qs, qc + kk2 * 16, jd * 8, LD))
            for w in range(TC_WARPS):
                kr = w * 16; ck0 = c0 + kr + G; ck1 = ck0 + 8
                for jd in range(DT):
                    col = jd * 8 + 2 * T4
                    for l in range(32):
                        for (ck, e0) in ((ck0[l], 0), (ck1[l], 2)):
                            if ck < p.Tk:
                                row = bk * p.Tk + ck
                                dk[row * D + col[l]] = dka[w][jd][l, e0] * p.scale; dk[row * D + col[l] + 1] = dka[w][jd][l, e0 + 1] * p.scale
                                dv[row * D + col[l]] = dva[w][jd][l, e0]; dv[row * D + col[l] + 1] = dva[w][jd][l, e0 + 1]
    return dk, dv


def case(B, H, Hkv, Tq, Tk, D, q_start, k_start, n_sink, window):
    p = P(); p.B, p.H, p.Hkv, p.Tq, p.Tk = B, H, Hkv, Tq, Tk
    p.q_start, p.k_start, p.n_sink, p.window, p.scale = q_start, k_start, n_sink, window, D ** -0.5
    q = rng.standard_normal(B * H * Tq * D); k = rng.standard_normal(B * Hkv * Tk * D); v = rng.standard_normal(B * Hkv * Tk * D)
    dout = rng.standard_normal(B * H * Tq * D)
    O, L, dQ, dK, dV = reference(q, k, v, dout, p, D)
    o, lse = fwd_mma(q, k, v, p, D)
    fin = np.isfinite(L)
    err = lambda a, b: np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)
    dlt = (dout.reshape(-1, D) * O.reshape(-1, D)).sum(1)
    dq = bwd_dq_mma(q, k, v, dout, L, dlt, p, D)
    dk, dv = bwd_dkv_mma(q, k, v, dout, L, dlt, p, D)
    print(f"B{B} H{H}/{Hkv} Tq{Tq} Tk{Tk} D{D} qs{q_start} ks{k_start} sink{n_sink} win{window}: "
          f"O {err(o, O):.1e} lse {np.abs(lse[fin] - L[fin]).max():.1e} (inf agree {np.array_equal(np.isinf(lse), np.isinf(L))}) "
          f"dq {err(dq, dQ):.1e} dk {err(dk, dK):.1e} dv {err(dv, dV):.1e}", flush=True)


case(1, 2, 1, 37, 37, 32, 0, 0, 0, 0)        # causal, GQA 2:1, ragged tile
case(1, 2, 2, 70, 70, 32, 0, 0, 0, 16)       # window
case(1, 4, 1, 20, 84, 32, 64, 0, 0, 0)       # prefill offset (queries after 64 cached keys)
case(1, 2, 1, 40, 43, 32, 0, 0, 3, 0)        # sinks (3 sink columns + 40 keys)
case(1, 1, 1, 1, 30, 64, 29, 0, 0, 0)        # one query (decode-like)
case(2, 4, 2, 130, 130, 64, 0, 0, 0, 0)      # two batches, 3 query blocks, D 64
case(1, 2, 1, 66, 66, 96, 0, 0, 2, 0)        # D 96 with sinks
case(1, 2, 1, 200, 200, 32, 0, 0, 0, 150)    # wide window: tiles inside it skip the mask, others not
case(1, 2, 2, 64, 192, 64, 128, 0, 64, 0)    # 64 sink slots (a sink-only tile) and a prefill offset
case(1, 1, 1, 128, 128, 128, 0, 0, 0, 0)     # D 128
print("tiles that skipped the mask:", FULL)
assert min(FULL.values()) > 0
