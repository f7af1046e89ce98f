// The delta rule (DeltaNet, Gated DeltaNet), one time step after another with the state in
// registers: see delta_scan.rs for the math. Per step, with α = e^{g} (1 without a gate):
//   S̃ = α S,   w = S̃ᵀ k,   u = β (v − w),   S = S̃ + k uᵀ,   o = Sᵀ q.
// Column j of S (d_k rows) evolves on its own given k, β, α and v_j, so a block owns NT/P
// columns of one (batch, head) and P threads share a column, RPT rows each (P = 1, 2, 4 for
// d_k ≤ 32, 64, 128); the sums over rows (w, o, and the backward's) are P-lane shuffles.
//
// Inputs are f32 rows of T steps per (batch·head): x = [q | k | β | g] (width ws = 2 d_k + 1 +
// gated), v and dO of width d_v. The backward writes dv directly and, per column tile, partial
// rows [dq | dk | dβ | dg] of x's layout (width ws), which the caller sums over tiles in a fixed
// order (linear_scan.cu's zoo_scan_sum). It first runs the forward once, keeping the state at the
// start of every TT-step chunk (ckpt), then walks the chunks in reverse: the chunk's states are recomputed into hist, and
// the steps run backward from them.

#define TT 16    // time steps staged in shared memory at once (also the checkpoint interval)
#define NT 64    // threads per block
#define RPT 32   // state rows per thread
#define KMAX 128 // largest d_k (P = 4)

struct Delta {
    const float* x; int ws;
    const float* v;
    const float* dout;
    float* out;   // forward: o (bh, t, dv); backward: dv (bh, t, dv)
    float* part;  // backward: [tile][bh][t][ws]
    float* ckpt;  // backward: [block][chunk][RPT][NT]
    float* hist;  // backward: [block][TT][RPT][NT]
    int bh, t, dk, dv, gated, tiles;
};

template <int P>
__device__ __forceinline__ float group_sum(float x) {
#pragma unroll
    for (int m = 1; m < P; m <<= 1) x += __shfl_xor_sync(0xffffffffu, x, m);
    return x;
}

// One step on this thread's rows of a state column: S̃ = α S, w = S̃ᵀ k (summed over the column's
// P threads), u = β (v − w), S = S̃ + k u. k points at this thread's rows of k_t.
template <int P>
__device__ __forceinline__ void advance(float (&s)[RPT], const float* k, float a, float beta, float v) {
    float w = 0.0f;
#pragma unroll
    for (int r = 0; r < RPT; ++r) {
        s[r] *= a;
        w = fmaf(k[r], s[r], w);
    }
    w = group_sum<P>(w);
    const float u = beta * (v - w);
#pragma unroll
    for (int r = 0; r < RPT; ++r) s[r] = fmaf(k[r], u, s[r]);
}

// Stage steps [base, base + n) of q, k (zero beyond d_k), β, α, v (and dO) into shared memory.
template <int P>
__device__ __forceinline__ void stage(const Delta& p, int bh, int tile, int base, int n, float (*sq)[KMAX],
                                      float (*sk)[KMAX], float* sb, float* sa, float (*sv)[NT], float (*sd)[NT]) {
    const int cols = NT / P, kw = P * RPT;
    const float* xb = p.x + (size_t)bh * p.t * p.ws;
    for (int e = threadIdx.x; e < TT * kw; e += NT) {
        const int s = e / kw, i = e % kw;
        const bool ok = s < n && i < p.dk;
        const float* row = xb + (size_t)(base + s) * p.ws;
        sq[s][i] = ok ? row[i] : 0.0f;
        sk[s][i] = ok ? row[p.dk + i] : 0.0f;
    }
    for (int s = threadIdx.x; s < TT; s += NT) {
        const float* row = xb + (size_t)(base + s) * p.ws;
        sb[s] = s < n ? row[2 * p.dk] : 0.0f;
        sa[s] = (s < n && p.gated) ? __expf(row[2 * p.dk + 1]) : 1.0f;
    }
    for (int e = threadIdx.x; e < TT * cols; e += NT) {
        const int s = e / cols, c = e % cols, j = tile * cols + c;
        const bool ok = s < n && j < p.dv;
        const size_t at = ((size_t)bh * p.t + base + s) * p.dv + j;
        sv[s][c] = ok ? p.v[at] : 0.0f;
        if (sd) sd[s][c] = ok ? p.dout[at] : 0.0f;
    }
}

template <int P>
__device__ void delta_fwd(const Delta& p) {
    __shared__ float sq[TT][KMAX], sk[TT][KMAX], sv[TT][NT], sb[TT], sa[TT];
    const int cols = NT / P, bh = blockIdx.x, tile = blockIdx.y;
    const int cl = threadIdx.x / P, r0 = (threadIdx.x % P) * RPT, j = tile * cols + cl;
    float s[RPT];
#pragma unroll
    for (int r = 0; r < RPT; ++r) s[r] = 0.0f;
    for (int base = 0; base < p.t; base += TT) {
        const int n = min(TT, p.t - base);
        __syncthreads();
        stage<P>(p, bh, tile, base, n, sq, sk, sb, sa, sv, nullptr);
        __syncthreads();
        for (int st = 0; st < n; ++st) {
            advance<P>(s, &sk[st][r0], sa[st], sb[st], sv[st][cl]);
            float o = 0.0f;
#pragma unroll
            for (int r = 0; r < RPT; ++r) o = fmaf(sq[st][r0 + r], s[r], o);
            o = group_sum<P>(o);
            if (r0 == 0 && j < p.dv) p.out[((size_t)bh * p.t + base + st) * p.dv + j] = o;
        }
    }
}

template <int P>
__device__ void delta_bwd(const Delta& p) {
    constexpr int KW = P * RPT, COLS = NT / P;
    __shared__ float sq[TT][KMAX], sk[TT][KMAX], sv[TT][NT], sd[TT][NT], sb[TT], sa[TT];
    // Per-column contributions to the row sums: dq (KW rows), dk (KW rows), dβ, dg.
    __shared__ float red[2 * KW + 2][COLS + 1];
    const int bh = blockIdx.x, tile = blockIdx.y, blk = bh * p.tiles + tile;
    const int cl = threadIdx.x / P, r0 = (threadIdx.x % P) * RPT, j = tile * COLS + cl;
    const int chunks = (p.t + TT - 1) / TT;
    float* ck = p.ckpt + (size_t)blk * chunks * RPT * NT + threadIdx.x;
    float* hi = p.hist + (size_t)blk * TT * RPT * NT + threadIdx.x;
    float s[RPT];
    // Forward, keeping the state entering each chunk.
#pragma unroll
    for (int r = 0; r < RPT; ++r) s[r] = 0.0f;
    for (int c = 0; c < chunks; ++c) {
        const int base = c * TT, n = min(TT, p.t - base);
#pragma unroll
        for (int r = 0; r < RPT; ++r) ck[((size_t)c * RPT + r) * NT] = s[r];
        if (c == chunks - 1) break;  // the last chunk's steps are recomputed below
        __syncthreads();
        stage<P>(p, bh, tile, base, n, sq, sk, sb, sa, sv, nullptr);
        __syncthreads();
        for (int st = 0; st < n; ++st) advance<P>(s, &sk[st][r0], sa[st], sb[st], sv[st][cl]);
    }
    // Backward, chunk by chunk from the end; g holds dS (the gradient of the state after step t).
    float g[RPT];
#pragma unroll
    for (int r = 0; r < RPT; ++r) g[r] = 0.0f;
    for (int c = chunks - 1; c >= 0; --c) {
        const int base = c * TT, n = min(TT, p.t - base);
        __syncthreads();
        stage<P>(p, bh, tile, base, n, sq, sk, sb, sa, sv, sd);
        __syncthreads();
        // The states entering each step of the chunk.
#pragma unroll
        for (int r = 0; r < RPT; ++r) s[r] = ck[((size_t)c * RPT + r) * NT];
        for (int st = 0; st < n; ++st) {
#pragma unroll
            for (int r = 0; r < RPT; ++r) hi[((size_t)st * RPT + r) * NT] = s[r];
            advance<P>(s, &sk[st][r0], sa[st], sb[st], sv[st][cl]);
        }
        for (int st = n - 1; st >= 0; --st) {
            const int t = base + st;
            const float a = sa[st], b = sb[st], vj = sv[st][cl], dj = sd[st][cl];
            // s: the state entering step t (before its decay).
            float w = 0.0f;
#pragma unroll
            for (int r = 0; r < RPT; ++r) {
                s[r] = hi[((size_t)st * RPT + r) * NT];
                w = fmaf(sk[st][r0 + r], a * s[r], w);
            }
            w = group_sum<P>(w);
            const float u = b * (vj - w);
            float du = 0.0f;
#pragma unroll
            for (int r = 0; r < RPT; ++r) {
                g[r] = fmaf(sq[st][r0 + r], dj, g[r]);  // + q_t dO_tᵀ
                du = fmaf(g[r], sk[st][r0 + r], du);
            }
            du = group_sum<P>(du);
            const float dw = -b * du;
            float dal = 0.0f;
#pragma unroll
            for (int r = 0; r < RPT; ++r) {
                const float kr = sk[st][r0 + r], sp = a * s[r];
                red[r0 + r][cl] = fmaf(kr, u, sp) * dj;            // dq: S_t dO
                red[KW + r0 + r][cl] = fmaf(g[r], u, sp * dw);     // dk: dS u + S̃ dw
                const float dst = fmaf(kr, dw, g[r]);              // dS̃ = dS + k dwᵀ
                dal = fmaf(s[r], dst, dal);
                g[r] = a * dst;                                    // dS_{t−1} = α dS̃
            }
            dal = group_sum<P>(dal);
            if (r0 == 0) {
                red[2 * KW][cl] = du * (vj - w);
                red[2 * KW + 1][cl] = dal * a;  // dg = α dα
                if (j < p.dv) p.out[((size_t)bh * p.t + t) * p.dv + j] = b * du;
            }
            __syncthreads();
            float* prow = p.part + (((size_t)tile * p.bh + bh) * p.t + t) * p.ws;
            for (int row = threadIdx.x; row < 2 * KW + 2; row += NT) {
                int col;
                if (row < KW) col = row < p.dk ? row : -1;
                else if (row < 2 * KW) col = row - KW < p.dk ? p.dk + row - KW : -1;
                else col = row == 2 * KW ? 2 * p.dk : (p.gated ? 2 * p.dk + 1 : -1);
                if (col < 0) continue;
                float acc = 0.0f;
                for (int q = 0; q < COLS; ++q) acc += red[row][q];
                prow[col] = acc;
            }
            __syncthreads();
        }
    }
}

extern "C" __global__ void __launch_bounds__(NT) zoo_delta_fwd_p1(Delta p) { delta_fwd<1>(p); }
extern "C" __global__ void __launch_bounds__(NT) zoo_delta_fwd_p2(Delta p) { delta_fwd<2>(p); }
extern "C" __global__ void __launch_bounds__(NT) zoo_delta_fwd_p4(Delta p) { delta_fwd<4>(p); }
extern "C" __global__ void __launch_bounds__(NT) zoo_delta_bwd_p1(Delta p) { delta_bwd<1>(p); }
extern "C" __global__ void __launch_bounds__(NT) zoo_delta_bwd_p2(Delta p) { delta_bwd<2>(p); }
extern "C" __global__ void __launch_bounds__(NT) zoo_delta_bwd_p4(Delta p) { delta_bwd<4>(p); }
