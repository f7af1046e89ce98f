// Tiled online-softmax attention (FlashAttention-2's algorithm, Dao 2023, Alg. 1 and 2) on CUDA
// cores in f32: forward returns O and the row log-sum-exp, backward recomputes P from it (a dQ
// kernel over query rows, a dK/dV kernel over key rows). Nothing of size Tq x Tk is stored.
//
// Layout: q (B, H, Tq, D), k and v (B, Hkv, Tk, D), contiguous; query head h reads kv head
// h / (H / Hkv) (GQA/MQA without repeating K/V). Key column c < n_sink is a learned sink slot every
// query sees; column c >= n_sink is the key at position k_start + c - n_sink. Query row i is at
// position q_start + i and sees keys at positions <= its own (causal), within `window` of it
// (window = 0: no window).
//
// Threads: TPR = 8 lanes share one row (each owns D / 8 of its elements; dot products are reduced
// with shuffles), ROWS = 16 rows per block of 128 threads. K/V (or Q/dO) tiles of BC rows are staged
// in shared memory as f32. Scores are kept in base 2 (scaled by log2 e) so that exp2 serves.
#include "convert.cuh"
#include "warp.cuh"
#include <stdint.h>

#define TPR 8
#define ROWS 16
#define THREADS (TPR * ROWS)
#define LOG2E 1.4426950408889634f


__device__ __forceinline__ float row_sum(float x) {
#pragma unroll
    for (int o = TPR / 2; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffff, x, o);
    return x;
}

struct Params {
    int B, H, Hkv, Tq, Tk;  // Tk counts the sink columns
    int q_start, k_start, n_sink, window;
    float scale;
};

// Whether query position qp sees key column c.
__device__ __forceinline__ bool visible(const Params& p, int qp, int c) {
    if (c < p.n_sink) return true;
    const int kp = p.k_start + c - p.n_sink;
    return kp <= qp && (p.window == 0 || qp - kp < p.window);
}

// The non-sink key columns any of the query positions [qlo, qhi] may see: [c_lo, c_hi).
__device__ __forceinline__ void key_range(const Params& p, int qlo, int qhi, int& c_lo, int& c_hi) {
    int lo = p.window == 0 ? 0 : qlo - p.window + 1 - p.k_start;
    int hi = qhi - p.k_start + 1;
    const int tk = p.Tk - p.n_sink;
    lo = max(lo, 0);
    hi = min(hi, tk);
    c_lo = p.n_sink + lo;
    c_hi = p.n_sink + max(hi, lo);
}

template <typename T, int D>
__device__ void load_tile(float* dst, const T* src, int rows, int tid) {
    for (int e = tid; e < rows * D; e += THREADS) dst[e] = to_f(src[e]);
}

// Forward. grid (ceil(Tq / ROWS), B * H). O (B, H, Tq, D) in T; lse (B, H, Tq) f32 in base 2 of
// the scaled scores (-inf for a row that sees nothing, whose O is 0).
template <typename T, int D>
__device__ void fwd(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ o,
                    float* __restrict__ lse, Params p) {
    constexpr int E = D / TPR;
    constexpr int BC = 4096 / D;
    constexpr int CH = 16;  // keys per softmax rescale
    extern __shared__ float smem[];
    float* ks = smem;
    float* vs = smem + BC * D;
    const int tid = threadIdx.x, lane = tid % TPR, r = tid / TPR;
    const int bh = blockIdx.y, b = bh / p.H, h = bh % p.H, hk = h / (p.H / p.Hkv);
    const int i = blockIdx.x * ROWS + r;
    const bool live = i < p.Tq;
    const T* qrow = q + ((size_t)bh * p.Tq + (live ? i : 0)) * D;
    const T* kb = k + (size_t)(b * p.Hkv + hk) * p.Tk * D;
    const T* vb = v + (size_t)(b * p.Hkv + hk) * p.Tk * D;
    float qr[E], acc[E];
    const float qscale = p.scale * LOG2E;
#pragma unroll
    for (int e = 0; e < E; e++) { qr[e] = live ? to_f(qrow[lane * E + e]) * qscale : 0.f; acc[e] = 0.f; }
    float m = -INFINITY, l = 0.f;
    const int qp = p.q_start + i;
    const int qlo = p.q_start + blockIdx.x * ROWS, qhi = min(qlo + ROWS, p.q_start + p.Tq) - 1;
    int c_lo, c_hi;
    key_range(p, qlo, qhi, c_lo, c_hi);
    for (int part = 0; part < 2; part++) {
        const int from = part == 0 ? 0 : c_lo, to = part == 0 ? p.n_sink : c_hi;
        for (int c0 = from; c0 < to; c0 += BC) {
            const int n = min(BC, to - c0);
            __syncthreads();
            load_tile<T, D>(ks, kb + (size_t)c0 * D, n, tid);
            load_tile<T, D>(vs, vb + (size_t)c0 * D, n, tid);
            __syncthreads();
            for (int j0 = 0; j0 < n; j0 += CH) {
                float s[CH];
                float mx = m;
#pragma unroll
                for (int jj = 0; jj < CH; jj++) {
                    const int j = j0 + jj;
                    float d = 0.f;
                    if (j < n) {
#pragma unroll
                        for (int e = 0; e < E; e++) d += qr[e] * ks[j * D + lane * E + e];
                    }
                    d = row_sum(d);
                    s[jj] = (j < n && live && visible(p, qp, c0 + j)) ? d : -INFINITY;
                    mx = fmaxf(mx, s[jj]);
                }
                if (mx == -INFINITY) continue;
                const float corr = exp2f(m - mx);
                l *= corr;
#pragma unroll
                for (int e = 0; e < E; e++) acc[e] *= corr;
#pragma unroll
                for (int jj = 0; jj < CH; jj++) {
                    const float pj = exp2f(s[jj] - mx);
                    l += pj;
                    if (pj != 0.f) {
#pragma unroll
                        for (int e = 0; e < E; e++) acc[e] += pj * vs[(j0 + jj) * D + lane * E + e];
                    }
                }
                m = mx;
            }
        }
    }
    if (!live) return;
    T* orow = o + ((size_t)bh * p.Tq + i) * D;
    const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
    for (int e = 0; e < E; e++) orow[lane * E + e] = from_f<T>(acc[e] * inv);
    if (lane == 0) lse[(size_t)bh * p.Tq + i] = l > 0.f ? m + log2f(l) : -INFINITY;
}

// dQ. grid (ceil(Tq / ROWS), B * H). dlt = rowsum(dO * O) (B, H, Tq) f32; dq (B, H, Tq, D) f32.
template <typename T, int D>
__device__ void bwd_dq(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                       const T* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ dlt,
                       float* __restrict__ dq, Params p) {
    constexpr int E = D / TPR;
    constexpr int BC = 4096 / D;
    extern __shared__ float smem[];
    float* ks = smem;
    float* vs = smem + BC * D;
    const int tid = threadIdx.x, lane = tid % TPR, r = tid / TPR;
    const int bh = blockIdx.y, b = bh / p.H, h = bh % p.H, hk = h / (p.H / p.Hkv);
    const int i = blockIdx.x * ROWS + r;
    const bool live = i < p.Tq;
    const size_t row = (size_t)bh * p.Tq + (live ? i : 0);
    const T* kb = k + (size_t)(b * p.Hkv + hk) * p.Tk * D;
    const T* vb = v + (size_t)(b * p.Hkv + hk) * p.Tk * D;
    float qr[E], dor[E], acc[E];
    const float qscale = p.scale * LOG2E;
#pragma unroll
    for (int e = 0; e < E; e++) {
        qr[e] = live ? to_f(q[row * D + lane * E + e]) * qscale : 0.f;
        dor[e] = live ? to_f(dout[row * D + lane * E + e]) : 0.f;
        acc[e] = 0.f;
    }
    const float L = live ? lse[row] : -INFINITY, Di = live ? dlt[row] : 0.f;
    const int qp = p.q_start + i;
    const int qlo = p.q_start + blockIdx.x * ROWS, qhi = min(qlo + ROWS, p.q_start + p.Tq) - 1;
    int c_lo, c_hi;
    key_range(p, qlo, qhi, c_lo, c_hi);
    for (int part = 0; part < 2; part++) {
        const int from = part == 0 ? 0 : c_lo, to = part == 0 ? p.n_sink : c_hi;
        for (int c0 = from; c0 < to; c0 += BC) {
            const int n = min(BC, to - c0);
            __syncthreads();
            load_tile<T, D>(ks, kb + (size_t)c0 * D, n, tid);
            load_tile<T, D>(vs, vb + (size_t)c0 * D, n, tid);
            __syncthreads();
            for (int j = 0; j < n; j++) {
                float s = 0.f, dp = 0.f;
#pragma unroll
                for (int e = 0; e < E; e++) {
                    s += qr[e] * ks[j * D + lane * E + e];
                    dp += dor[e] * vs[j * D + lane * E + e];
                }
                s = row_sum(s);
                dp = row_sum(dp);
                if (!live || L == -INFINITY || !visible(p, qp, c0 + j)) continue;
                const float ds = exp2f(s - L) * (dp - Di);
#pragma unroll
                for (int e = 0; e < E; e++) acc[e] += ds * ks[j * D + lane * E + e];
            }
        }
    }
    if (!live) return;
#pragma unroll
    for (int e = 0; e < E; e++) dq[row * D + lane * E + e] = acc[e] * p.scale;
}

// dK, dV. grid (ceil(Tk / ROWS), B * Hkv): each row is one key column of one kv head, summed over
// the H / Hkv query heads that read it. dk, dv (B, Hkv, Tk, D) f32.
template <typename T, int D>
__device__ void bwd_dkv(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                        const T* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ dlt,
                        float* __restrict__ dk, float* __restrict__ dv, Params p) {
    constexpr int E = D / TPR;
    constexpr int BR = 4096 / D;  // query rows per tile
    extern __shared__ float smem[];
    float* qs = smem;
    float* dos = smem + BR * D;
    float* ls = smem + 2 * BR * D;
    float* dl = ls + BR;
    const int tid = threadIdx.x, lane = tid % TPR, r = tid / TPR;
    const int bk = blockIdx.y, b = bk / p.Hkv, hk = bk % p.Hkv, group = p.H / p.Hkv;
    const int c = blockIdx.x * ROWS + r;
    const bool live = c < p.Tk;
    const size_t krow = (size_t)bk * p.Tk + (live ? c : 0);
    float kr[E], vr[E], ak[E], av[E];
    const float qscale = p.scale * LOG2E;
#pragma unroll
    for (int e = 0; e < E; e++) {
        kr[e] = live ? to_f(k[krow * D + lane * E + e]) : 0.f;
        vr[e] = live ? to_f(v[krow * D + lane * E + e]) : 0.f;
        ak[e] = 0.f;
        av[e] = 0.f;
    }
    // Query rows this block's keys may be seen by.
    const int c_first = blockIdx.x * ROWS, c_last = min(c_first + ROWS, p.Tk) - 1;
    int i_lo = 0, i_hi = p.Tq;
    if (c_first >= p.n_sink) {
        const int kp_lo = p.k_start + c_first - p.n_sink, kp_hi = p.k_start + c_last - p.n_sink;
        i_lo = max(kp_lo - p.q_start, 0);
        if (p.window != 0) i_hi = min(p.Tq, kp_hi + p.window - p.q_start);
        i_hi = max(i_hi, i_lo);
    }
    for (int g = 0; g < group; g++) {
        const int bh = b * p.H + hk * group + g;
        for (int i0 = i_lo; i0 < i_hi; i0 += BR) {
            const int n = min(BR, i_hi - i0);
            __syncthreads();
            load_tile<T, D>(qs, q + ((size_t)bh * p.Tq + i0) * D, n, tid);
            load_tile<T, D>(dos, dout + ((size_t)bh * p.Tq + i0) * D, n, tid);
            for (int e = tid; e < n; e += THREADS) {
                ls[e] = lse[(size_t)bh * p.Tq + i0 + e];
                dl[e] = dlt[(size_t)bh * p.Tq + i0 + e];
            }
            __syncthreads();
            for (int ii = 0; ii < n; ii++) {
                float s = 0.f, dp = 0.f;
#pragma unroll
                for (int e = 0; e < E; e++) {
                    s += kr[e] * qs[ii * D + lane * E + e];
                    dp += vr[e] * dos[ii * D + lane * E + e];
                }
                s = row_sum(s) * qscale;
                dp = row_sum(dp);
                const float L = ls[ii];
                if (!live || L == -INFINITY || !visible(p, p.q_start + i0 + ii, c)) continue;
                const float pij = exp2f(s - L);
                const float ds = pij * (dp - dl[ii]);
#pragma unroll
                for (int e = 0; e < E; e++) {
                    av[e] += pij * dos[ii * D + lane * E + e];
                    ak[e] += ds * qs[ii * D + lane * E + e];
                }
            }
        }
    }
    if (!live) return;
#pragma unroll
    for (int e = 0; e < E; e++) {
        dk[krow * D + lane * E + e] = ak[e] * p.scale;
        dv[krow * D + lane * E + e] = av[e];
    }
}

#define KERNELS(T, NAME, D)                                                                                     \
    extern "C" __global__ void __launch_bounds__(THREADS) zoo_flash_fwd_##NAME##_##D(                          \
        const T* q, const T* k, const T* v, T* o, float* lse, Params p) {                                       \
        fwd<T, D>(q, k, v, o, lse, p);                                                                          \
    }                                                                                                           \
    extern "C" __global__ void __launch_bounds__(THREADS) zoo_flash_dq_##NAME##_##D(                           \
        const T* q, const T* k, const T* v, const T* dout, const float* lse, const float* dlt, float* dq,      \
        Params p) {                                                                                             \
        bwd_dq<T, D>(q, k, v, dout, lse, dlt, dq, p);                                                           \
    }                                                                                                           \
    extern "C" __global__ void __launch_bounds__(THREADS) zoo_flash_dkv_##NAME##_##D(                          \
        const T* q, const T* k, const T* v, const T* dout, const float* lse, const float* dlt, float* dk,      \
        float* dv, Params p) {                                                                                  \
        bwd_dkv<T, D>(q, k, v, dout, lse, dlt, dk, dv, p);                                                      \
    }

#define ALL_DIMS(T, NAME) \
    KERNELS(T, NAME, 32)  \
    KERNELS(T, NAME, 64)  \
    KERNELS(T, NAME, 96)  \
    KERNELS(T, NAME, 128) \
    KERNELS(T, NAME, 192) \
    KERNELS(T, NAME, 256)

ALL_DIMS(float, f32)
ALL_DIMS(__nv_bfloat16, bf16)
ALL_DIMS(__half, f16)

// ---------------------------------------------------------------------------------------------
// Tensor-core kernels (bf16 / f16 inputs): the same algorithms with the matrix products on WMMA
// 16x16x16 tiles (f32 accumulation). 4 warps per block, each owning 16 rows (queries in the forward
// and dQ, keys in dK/dV); tiles of 64 on the other side. A warp's scores (16 x 64, f32), P or dS
// (16 x 64, T) and its accumulator (16 x D, f32) live in shared memory: WMMA's register layout is
// opaque, so the per-row steps (online-softmax rescaling, masking, exp) run on the whole warp one
// row at a time (lanes over columns: no bank conflicts), and the products accumulate through
// load/mma/store. Tiles are staged with 16-byte loads (the launcher checks the alignment).
#include <mma.h>

#define TC_WARPS 4
#define TC_BR (16 * TC_WARPS)
#define TC_BC 64

// Rows first .. first + n of a row-major (rows x D) matrix into dst (n x D); rows at or beyond
// `limit` are zero. 16-byte vectors: D is a multiple of 8 and src 16-byte aligned.
template <typename T, int D>
__device__ __forceinline__ void load_rows(T* dst, const T* src, int first, int n, int limit, int tid, int nthreads) {
    constexpr int V = D / 8;
    const uint4* s4 = reinterpret_cast<const uint4*>(src);
    uint4* d4 = reinterpret_cast<uint4*>(dst);
    for (int e = tid; e < n * V; e += nthreads) {
        const int r = e / V;
        d4[e] = first + r < limit ? s4[(size_t)(first + r) * V + e % V] : make_uint4(0, 0, 0, 0);
    }
}

// C (16 x N, f32, ld ldc) (+)= A (16 x K, row-major, ld lda) * B; B (K x N) row-major with ld ldb,
// or (B_T) the transpose of a row-major (N x K) matrix with ld ldb.
template <typename T, int K, int N, bool B_T>
__device__ __forceinline__ void warp_mm(float* c, int ldc, const T* a, int lda, const T* bm, int ldb, bool accumulate) {
    using namespace nvcuda;
#pragma unroll
    for (int nb = 0; nb < N / 16; nb++) {
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
        if (accumulate) wmma::load_matrix_sync(acc, c + nb * 16, ldc, wmma::mem_row_major);
        else wmma::fill_fragment(acc, 0.f);
#pragma unroll
        for (int kk = 0; kk < K / 16; kk++) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
            wmma::load_matrix_sync(fa, a + kk * 16, lda);
            if (B_T) {
                wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
                wmma::load_matrix_sync(fb, bm + nb * 16 * ldb + kk * 16, ldb);
                wmma::mma_sync(acc, fa, fb, acc);
            } else {
                wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
                wmma::load_matrix_sync(fb, bm + kk * 16 * ldb + nb * 16, ldb);
                wmma::mma_sync(acc, fa, fb, acc);
            }
        }
        wmma::store_matrix_sync(c + nb * 16, acc, ldc, wmma::mem_row_major);
    }
}

// Forward. grid (ceil(Tq / 64), B * H), 128 threads.
template <typename T, int D>
__device__ void fwd_tc(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ o,
                       float* __restrict__ lse, Params p) {
    extern __shared__ __align__(128) unsigned char tc_smem[];
    T* qs = reinterpret_cast<T*>(tc_smem);                 // TC_BR x D
    T* ks = qs + TC_BR * D;                                 // TC_BC x D
    T* vs = ks + TC_BC * D;                                 // TC_BC x D
    T* ps = vs + TC_BC * D;                                 // TC_WARPS x 16 x TC_BC
    float* ss = reinterpret_cast<float*>(ps + TC_WARPS * 16 * TC_BC);  // TC_WARPS x 16 x TC_BC
    float* os = ss + TC_WARPS * 16 * TC_BC;                 // TC_WARPS x 16 x D
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, nth = blockDim.x;
    const int bh = blockIdx.y, b = bh / p.H, h = bh % p.H, hk = h / (p.H / p.Hkv);
    const int i0 = blockIdx.x * TC_BR;
    const T* kb = k + (size_t)(b * p.Hkv + hk) * p.Tk * D;
    const T* vb = v + (size_t)(b * p.Hkv + hk) * p.Tk * D;
    load_rows<T, D>(qs, q + (size_t)bh * p.Tq * D, i0, TC_BR, p.Tq, tid, nth);
    float* ow = os + warp * 16 * D;
    float* sw = ss + warp * 16 * TC_BC;
    T* pw = ps + warp * 16 * TC_BC;
    for (int e = lane; e < 16 * D; e += 32) ow[e] = 0.f;
    const int iw = i0 + warp * 16;  // the warp's first query row
    float mrow[16], lrow[16];
#pragma unroll
    for (int rr = 0; rr < 16; rr++) { mrow[rr] = -INFINITY; lrow[rr] = 0.f; }
    const float sc = p.scale * LOG2E;
    const int qlo = p.q_start + i0, qhi = min(qlo + TC_BR, p.q_start + p.Tq) - 1;
    int c_lo, c_hi;
    key_range(p, qlo, qhi, c_lo, c_hi);
    for (int part = 0; part < 2; part++) {
        const int from = part == 0 ? 0 : c_lo, to = part == 0 ? p.n_sink : c_hi;
        for (int c0 = from; c0 < to; c0 += TC_BC) {
            __syncthreads();
            load_rows<T, D>(ks, kb, c0, TC_BC, to, tid, nth);
            load_rows<T, D>(vs, vb, c0, TC_BC, to, tid, nth);
            __syncthreads();
            warp_mm<T, D, TC_BC, true>(sw, TC_BC, qs + warp * 16 * D, D, ks, D, false);  // S = Q_w K^T
            __syncwarp();
#pragma unroll
            for (int rr = 0; rr < 16; rr++) {
                const int i = iw + rr, qp = p.q_start + i;
                const bool live = i < p.Tq;
                const int j0 = lane, j1 = lane + 32;
                const float s0 = live && c0 + j0 < to && visible(p, qp, c0 + j0) ? sw[rr * TC_BC + j0] * sc : -INFINITY;
                const float s1 = live && c0 + j1 < to && visible(p, qp, c0 + j1) ? sw[rr * TC_BC + j1] * sc : -INFINITY;
                const float mx = fmaxf(mrow[rr], warp_max(fmaxf(s0, s1)));
                const float corr = mx == -INFINITY ? 1.f : exp2f(mrow[rr] - mx);
                const float p0 = mx == -INFINITY ? 0.f : exp2f(s0 - mx), p1 = mx == -INFINITY ? 0.f : exp2f(s1 - mx);
                lrow[rr] = lrow[rr] * corr + warp_sum(p0 + p1);
                mrow[rr] = mx;
                pw[rr * TC_BC + j0] = from_f<T>(p0);
                pw[rr * TC_BC + j1] = from_f<T>(p1);
                if (corr != 1.f)
                    for (int e = lane; e < D; e += 32) ow[rr * D + e] *= corr;
            }
            __syncwarp();
            warp_mm<T, TC_BC, D, false>(ow, D, pw, TC_BC, vs, D, true);  // O_w += P_w V
            __syncwarp();
        }
    }
#pragma unroll
    for (int rr = 0; rr < 16; rr++) {
        const int i = iw + rr;
        if (i >= p.Tq) break;
        const float inv = lrow[rr] > 0.f ? 1.f / lrow[rr] : 0.f;
        T* orow = o + ((size_t)bh * p.Tq + i) * D;
        for (int e = lane; e < D; e += 32) orow[e] = from_f<T>(ow[rr * D + e] * inv);
        if (lane == 0) lse[(size_t)bh * p.Tq + i] = lrow[rr] > 0.f ? mrow[rr] + log2f(lrow[rr]) : -INFINITY;
    }
}

// dK, dV. grid (ceil(Tk / 64), B * Hkv), 128 threads.
template <typename T, int D>
__device__ void bwd_dkv_tc(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                           const T* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ dlt,
                           float* __restrict__ dk, float* __restrict__ dv, Params p) {
    extern __shared__ __align__(128) unsigned char tc_smem[];
    T* ks = reinterpret_cast<T*>(tc_smem);       // 64 x D (this block's keys)
    T* vs = ks + TC_BC * D;                       // 64 x D
    T* qs = vs + TC_BC * D;                       // 64 x D (a query tile)
    T* dos = qs + TC_BR * D;                      // 64 x D
    T* pt = dos + TC_BR * D;                      // per warp 16 x 64: P^T, then dS^T
    float* st = reinterpret_cast<float*>(pt + TC_WARPS * 16 * TC_BR);  // per warp 16 x 64 f32
    float* dks = st + TC_WARPS * 16 * TC_BR;      // per warp 16 x D
    float* dvs = dks + TC_WARPS * 16 * D;         // per warp 16 x D
    float* ls = dvs + TC_WARPS * 16 * D;          // 64
    float* dl = ls + TC_BR;                       // 64
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, nth = blockDim.x;
    const int bk = blockIdx.y, b = bk / p.Hkv, hk = bk % p.Hkv, group = p.H / p.Hkv;
    const int c0 = blockIdx.x * TC_BC;
    load_rows<T, D>(ks, k + (size_t)bk * p.Tk * D, c0, TC_BC, p.Tk, tid, nth);
    load_rows<T, D>(vs, v + (size_t)bk * p.Tk * D, c0, TC_BC, p.Tk, tid, nth);
    float* dkw = dks + warp * 16 * D;
    float* dvw = dvs + warp * 16 * D;
    float* sw = st + warp * 16 * TC_BR;
    T* pw = pt + warp * 16 * TC_BR;
    for (int e = lane; e < 16 * D; e += 32) { dkw[e] = 0.f; dvw[e] = 0.f; }
    const float sc = p.scale * LOG2E;
    const int c_last = min(c0 + TC_BC, p.Tk) - 1;
    int i_lo = 0, i_hi = p.Tq;
    if (c0 >= p.n_sink) {
        const int kp_lo = p.k_start + c0 - p.n_sink, kp_hi = p.k_start + c_last - p.n_sink;
        i_lo = max(kp_lo - p.q_start, 0);
        if (p.window != 0) i_hi = min(p.Tq, kp_hi + p.window - p.q_start);
        i_hi = max(i_hi, i_lo);
    }
    const int cw = c0 + warp * 16;  // the warp's first key column
    for (int g = 0; g < group; g++) {
        const int bh = b * p.H + hk * group + g;
        for (int i0 = i_lo; i0 < i_hi; i0 += TC_BR) {
            __syncthreads();
            load_rows<T, D>(qs, q + (size_t)bh * p.Tq * D, i0, TC_BR, p.Tq, tid, nth);
            load_rows<T, D>(dos, dout + (size_t)bh * p.Tq * D, i0, TC_BR, p.Tq, tid, nth);
            for (int e = tid; e < TC_BR; e += nth) {
                const bool in = i0 + e < p.Tq;
                ls[e] = in ? lse[(size_t)bh * p.Tq + i0 + e] : -INFINITY;
                dl[e] = in ? dlt[(size_t)bh * p.Tq + i0 + e] : 0.f;
            }
            __syncthreads();
            warp_mm<T, D, TC_BR, true>(sw, TC_BR, ks + warp * 16 * D, D, qs, D, false);  // S^T = K_w Q^T
            __syncwarp();
#pragma unroll 4
            for (int rr = 0; rr < 16; rr++) {
                const int c = cw + rr;
#pragma unroll
                for (int u = 0; u < 2; u++) {
                    const int j = lane + 32 * u, i = i0 + j;
                    const bool ok = c < p.Tk && i < p.Tq && ls[j] != -INFINITY && visible(p, p.q_start + i, c);
                    pw[rr * TC_BR + j] = from_f<T>(ok ? exp2f(sw[rr * TC_BR + j] * sc - ls[j]) : 0.f);
                }
            }
            __syncwarp();
            warp_mm<T, TC_BR, D, false>(dvw, D, pw, TC_BR, dos, D, true);                 // dV_w += P^T dO
            warp_mm<T, D, TC_BR, true>(sw, TC_BR, vs + warp * 16 * D, D, dos, D, false);  // dP^T = V_w dO^T
            __syncwarp();
#pragma unroll 4
            for (int rr = 0; rr < 16; rr++) {
#pragma unroll
                for (int u = 0; u < 2; u++) {
                    const int j = lane + 32 * u;
                    const float pj = to_f(pw[rr * TC_BR + j]);
                    pw[rr * TC_BR + j] = from_f<T>(pj * (sw[rr * TC_BR + j] - dl[j]));
                }
            }
            __syncwarp();
            warp_mm<T, TC_BR, D, false>(dkw, D, pw, TC_BR, qs, D, true);  // dK_w += dS^T Q
            __syncwarp();
        }
    }
    for (int rr = 0; rr < 16; rr++) {
        const int c = cw + rr;
        if (c >= p.Tk) break;
        const size_t row = (size_t)bk * p.Tk + c;
        for (int e = lane; e < D; e += 32) {
            dk[row * D + e] = dkw[rr * D + e] * p.scale;
            dv[row * D + e] = dvw[rr * D + e];
        }
    }
}

// dQ. grid (ceil(Tq / 64), B * H), 128 threads.
template <typename T, int D>
__device__ void bwd_dq_tc(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                          const T* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ dlt,
                          float* __restrict__ dq, Params p) {
    extern __shared__ __align__(128) unsigned char tc_smem[];
    T* qs = reinterpret_cast<T*>(tc_smem);       // 64 x D
    T* dos = qs + TC_BR * D;                      // 64 x D
    T* ks = dos + TC_BR * D;                      // 64 x D (a key tile)
    T* vs = ks + TC_BC * D;                       // 64 x D
    T* pt = vs + TC_BC * D;                       // per warp 16 x 64: P, then dS
    float* st = reinterpret_cast<float*>(pt + TC_WARPS * 16 * TC_BC);  // per warp 16 x 64 f32
    float* dqs = st + TC_WARPS * 16 * TC_BC;      // per warp 16 x D
    float* lq = dqs + TC_WARPS * 16 * D;          // 64: lse of the block's rows
    float* dlq = lq + TC_BR;                      // 64: D_i
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, nth = blockDim.x;
    const int bh = blockIdx.y, b = bh / p.H, h = bh % p.H, hk = h / (p.H / p.Hkv);
    const int i0 = blockIdx.x * TC_BR;
    load_rows<T, D>(qs, q + (size_t)bh * p.Tq * D, i0, TC_BR, p.Tq, tid, nth);
    load_rows<T, D>(dos, dout + (size_t)bh * p.Tq * D, i0, TC_BR, p.Tq, tid, nth);
    for (int e = tid; e < TC_BR; e += nth) {
        const bool in = i0 + e < p.Tq;
        lq[e] = in ? lse[(size_t)bh * p.Tq + i0 + e] : -INFINITY;
        dlq[e] = in ? dlt[(size_t)bh * p.Tq + i0 + e] : 0.f;
    }
    const T* kb = k + (size_t)(b * p.Hkv + hk) * p.Tk * D;
    const T* vb = v + (size_t)(b * p.Hkv + hk) * p.Tk * D;
    float* dqw = dqs + warp * 16 * D;
    float* sw = st + warp * 16 * TC_BC;
    T* pw = pt + warp * 16 * TC_BC;
    for (int e = lane; e < 16 * D; e += 32) dqw[e] = 0.f;
    const int iw = i0 + warp * 16;
    const float sc = p.scale * LOG2E;
    const int qlo = p.q_start + i0, qhi = min(qlo + TC_BR, p.q_start + p.Tq) - 1;
    int c_lo, c_hi;
    key_range(p, qlo, qhi, c_lo, c_hi);
    for (int part = 0; part < 2; part++) {
        const int from = part == 0 ? 0 : c_lo, to = part == 0 ? p.n_sink : c_hi;
        for (int c0 = from; c0 < to; c0 += TC_BC) {
            __syncthreads();
            load_rows<T, D>(ks, kb, c0, TC_BC, to, tid, nth);
            load_rows<T, D>(vs, vb, c0, TC_BC, to, tid, nth);
            __syncthreads();
            warp_mm<T, D, TC_BC, true>(sw, TC_BC, qs + warp * 16 * D, D, ks, D, false);  // S = Q_w K^T
            __syncwarp();
#pragma unroll 4
            for (int rr = 0; rr < 16; rr++) {
                const int i = iw + rr;
                const float L = lq[warp * 16 + rr];
#pragma unroll
                for (int u = 0; u < 2; u++) {
                    const int j = lane + 32 * u, cc = c0 + j;
                    const bool ok = i < p.Tq && cc < to && L != -INFINITY && visible(p, p.q_start + i, cc);
                    pw[rr * TC_BC + j] = from_f<T>(ok ? exp2f(sw[rr * TC_BC + j] * sc - L) : 0.f);
                }
            }
            __syncwarp();
            warp_mm<T, D, TC_BC, true>(sw, TC_BC, dos + warp * 16 * D, D, vs, D, false);  // dP = dO_w V^T
            __syncwarp();
#pragma unroll 4
            for (int rr = 0; rr < 16; rr++) {
                const float Di = dlq[warp * 16 + rr];
#pragma unroll
                for (int u = 0; u < 2; u++) {
                    const int j = lane + 32 * u;
                    const float pj = to_f(pw[rr * TC_BC + j]);
                    pw[rr * TC_BC + j] = from_f<T>(pj * (sw[rr * TC_BC + j] - Di));
                }
            }
            __syncwarp();
            warp_mm<T, TC_BC, D, false>(dqw, D, pw, TC_BC, ks, D, true);  // dQ_w += dS K
            __syncwarp();
        }
    }
    for (int rr = 0; rr < 16; rr++) {
        const int i = iw + rr;
        if (i >= p.Tq) break;
        const size_t row = (size_t)bh * p.Tq + i;
        for (int e = lane; e < D; e += 32) dq[row * D + e] = dqw[rr * D + e] * p.scale;
    }
}

// The exported kernels of a tensor-core family KIND (tc: WMMA, mma: mma.sync): zoo_flash_fwd_KIND_*,
// zoo_flash_dkv_KIND_* and zoo_flash_dq_KIND_* call fwd_KIND, bwd_dkv_KIND and bwd_dq_KIND.
#define FWD_KERNEL(KIND, T, NAME, D)                                                                  \
    extern "C" __global__ void __launch_bounds__(32 * TC_WARPS) zoo_flash_fwd_##KIND##_##NAME##_##D(   \
        const T* q, const T* k, const T* v, T* o, float* lse, Params p) {                             \
        fwd_##KIND<T, D>(q, k, v, o, lse, p);                                                          \
    }
#define BWD_KERNELS(KIND, T, NAME, D)                                                                         \
    extern "C" __global__ void __launch_bounds__(32 * TC_WARPS) zoo_flash_dkv_##KIND##_##NAME##_##D(         \
        const T* q, const T* k, const T* v, const T* dout, const float* lse, const float* dlt, float* dk,    \
        float* dv, Params p) {                                                                                \
        bwd_dkv_##KIND<T, D>(q, k, v, dout, lse, dlt, dk, dv, p);                                             \
    }                                                                                                         \
    extern "C" __global__ void __launch_bounds__(32 * TC_WARPS) zoo_flash_dq_##KIND##_##NAME##_##D(          \
        const T* q, const T* k, const T* v, const T* dout, const float* lse, const float* dlt, float* dq,    \
        Params p) {                                                                                           \
        bwd_dq_##KIND<T, D>(q, k, v, dout, lse, dlt, dq, p);                                                  \
    }
#define TC_ALL(T, NAME)                                                                                       \
    FWD_KERNEL(tc, T, NAME, 32) FWD_KERNEL(tc, T, NAME, 64) FWD_KERNEL(tc, T, NAME, 96)                      \
    FWD_KERNEL(tc, T, NAME, 128) FWD_KERNEL(tc, T, NAME, 192) FWD_KERNEL(tc, T, NAME, 256)                    \
    BWD_KERNELS(tc, T, NAME, 32) BWD_KERNELS(tc, T, NAME, 64) BWD_KERNELS(tc, T, NAME, 96)                   \
    BWD_KERNELS(tc, T, NAME, 128)
TC_ALL(__nv_bfloat16, bf16)
TC_ALL(__half, f16)

// ---- Forward on mma.sync (m16n8k16, f32 accumulation) with S, P and O in registers ----
// The tiling of fwd_tc (4 warps x 16 query rows, key tiles of 64) and its outputs (O, and the LSE
// in base 2 of the scaled scores), so the backward kernels serve it unchanged. A warp's S
// (16 x 64), P and O (16 x D) stay in registers in the m16n8 accumulator layout: lane l holds rows
// g = l / 4 and g + 8, columns 2 (l % 4) + {0, 1} of every 8-column tile; a row's max and sum
// reduce over the 4 lanes that share it. P's accumulator tiles are the A operand of P V as they
// are (FlashAttention-2's register reuse). Q, K and V tiles sit in shared memory with rows padded
// by 8 elements, so the fragment loads hit 32 distinct banks. Head dims 32, 64, 96, 128.
#define MMA_PAD 8

template <typename T> __device__ __forceinline__ uint32_t pack2(float a, float b);
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float a, float b) {
    __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&v);
}
template <> __device__ __forceinline__ uint32_t pack2<__half>(float a, float b) {
    __half2 v = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&v);
}
// Two 16-bit elements as one register, `lo` in the low half (the lower column / row index).
template <typename T> __device__ __forceinline__ uint32_t pack_raw(T lo, T hi) {
    return (uint32_t)(*reinterpret_cast<const uint16_t*>(&lo)) | ((uint32_t)(*reinterpret_cast<const uint16_t*>(&hi)) << 16);
}
template <typename T> __device__ __forceinline__ uint32_t ld32(const T* p) { return *reinterpret_cast<const uint32_t*>(p); }

// c (16 x 8, f32) += a (16 x 16) b (16 x 8).
template <typename T> __device__ __forceinline__ void mma16816(float* c, const uint32_t* a, const uint32_t* b);
template <> __device__ __forceinline__ void mma16816<__nv_bfloat16>(float* c, const uint32_t* a, const uint32_t* b) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <> __device__ __forceinline__ void mma16816<__half>(float* c, const uint32_t* a, const uint32_t* b) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// load_rows with a destination row stride of LD elements (16-byte multiples).
template <typename T, int D, int LD>
__device__ __forceinline__ void load_rows_ld(T* dst, const T* src, int first, int n, int limit, int tid, int nthreads) {
    constexpr int V = D / 8;
    const uint4* s4 = reinterpret_cast<const uint4*>(src);
    for (int e = tid; e < n * V; e += nthreads) {
        const int r = e / V, c = e % V;
        *reinterpret_cast<uint4*>(dst + r * LD + c * 8) =
            first + r < limit ? s4[(size_t)(first + r) * V + c] : make_uint4(0, 0, 0, 0);
    }
}

// Fragments from shared-memory tiles. With LDSM (the mma2 kernels) each is one `ldmatrix` (x4 for
// A; x2, or x2.trans for B from a row-major k x n tile): lane l gives the address of row l % 8 of
// matrix l / 8 and receives, of matrix i, row l / 4 and columns 2 (l % 4) + {0, 1} (.trans: rows
// 2 (l % 4) + {0, 1} of column l / 4), which is the mma.m16n8k16 fragment layout. Without it (the
// mma kernels), the same fragments come from 32- and 16-bit loads; scripts/attention-mma-sim.py
// checks the ldmatrix addressing against them. Row addresses are
// 16-byte aligned (tiles start 16-byte aligned, LD = D + 8 elements, columns at multiples of 8),
// and the 8 rows of a matrix (strides of 20, 36, 52, 68 words at D = 32, 64, 96, 128) fall in
// distinct 4-bank groups, so each ldmatrix is conflict-free.
__device__ __forceinline__ uint32_t smem_addr(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }

// The A fragment (16 x 16, row-major) at rows r..r+16, columns c..c+16 of a tile with stride LD.
template <typename T, int LD, bool LDSM>
__device__ __forceinline__ void load_a(uint32_t* a, const T* base, int r, int c, int g, int t4) {
    if constexpr (LDSM) {
        const int l = threadIdx.x & 31;
        const T* x = base + (r + (l & 7) + ((l >> 3) & 1) * 8) * LD + c + (l >> 4) * 8;
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3])
                     : "r"(smem_addr(x)));
    } else {
        a[0] = ld32(base + (r + g) * LD + c + 2 * t4);
        a[1] = ld32(base + (r + g + 8) * LD + c + 2 * t4);
        a[2] = ld32(base + (r + g) * LD + c + 8 + 2 * t4);
        a[3] = ld32(base + (r + g + 8) * LD + c + 8 + 2 * t4);
    }
}
// The A fragment of a 16-wide k step from two accumulator tiles (16 x 8 each) held as f32.
template <typename T>
__device__ __forceinline__ void acc_to_a(uint32_t* a, const float* lo, const float* hi) {
    a[0] = pack2<T>(lo[0], lo[1]);
    a[1] = pack2<T>(lo[2], lo[3]);
    a[2] = pack2<T>(hi[0], hi[1]);
    a[3] = pack2<T>(hi[2], hi[3]);
}
// The B fragment (16 x 8) whose k runs down the rows r..r+16 of a row-major tile (stride LD) and
// whose n is columns n0..n0+8: pairs of rows packed.
template <typename T, int LD, bool LDSM>
__device__ __forceinline__ void load_b_rows(uint32_t* b, const T* base, int r, int n0, int g, int t4) {
    if constexpr (LDSM) {
        const int l = threadIdx.x & 31;
        const T* x = base + (r + (l & 7) + ((l >> 3) & 1) * 8) * LD + n0;
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                     : "=r"(b[0]), "=r"(b[1])
                     : "r"(smem_addr(x)));
    } else {
        const T* x = base + (r + 2 * t4) * LD + n0 + g;
        b[0] = pack_raw<T>(x[0], x[LD]);
        b[1] = pack_raw<T>(x[8 * LD], x[9 * LD]);
    }
}
// The B fragment (16 x 8) whose k runs along the columns c..c+16 of rows n0..n0+8 (a transposed
// operand: B[k][n] = tile[n0 + n][c + k]).
template <typename T, int LD, bool LDSM>
__device__ __forceinline__ void load_b_cols(uint32_t* b, const T* base, int n0, int c, int g, int t4) {
    if constexpr (LDSM) {
        const int l = threadIdx.x & 31;
        const T* x = base + (n0 + (l & 7)) * LD + c + ((l >> 3) & 1) * 8;
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
                     : "=r"(b[0]), "=r"(b[1])
                     : "r"(smem_addr(x)));
    } else {
        const T* x = base + (n0 + g) * LD + c + 2 * t4;
        b[0] = ld32(x);
        b[1] = ld32(x + 8);
    }
}

// Whether the warp's query rows [i_a, i_b) see every key column of [c_a, c_b), all of them real
// (i_b <= Tq, c_b <= c_limit): then the tile needs no mask. Sink-only tiles and tiles wholly
// below the causal diagonal and inside the window qualify; mixed sink/key tiles take the mask.
__device__ __forceinline__ bool tile_visible(const Params& p, int i_a, int i_b, int c_a, int c_b, int c_limit) {
    if (i_b > p.Tq || c_b > c_limit) return false;
    if (c_b <= p.n_sink) return true;
    if (c_a < p.n_sink) return false;
    const int kp_lo = p.k_start + c_a - p.n_sink, kp_hi = p.k_start + c_b - 1 - p.n_sink;
    const int qp_lo = p.q_start + i_a, qp_hi = p.q_start + i_b - 1;
    return kp_hi <= qp_lo && (p.window == 0 || qp_hi - kp_lo < p.window);
}

// load_rows_ld by cp.async (16 bytes a copy, bypassing L1): rows at or beyond `limit` are zero-filled
// (source size 0; the source address stays a valid one). Completes at cp_async_wait.
template <typename T, int D, int LD>
__device__ __forceinline__ void load_rows_async(T* dst, const T* src, int first, int n, int limit, int tid, int nthreads) {
    constexpr int V = D / 8;
    for (int e = tid; e < n * V; e += nthreads) {
        const int r = e / V, c = e % V;
        const bool in = first + r < limit;
        const T* s = in ? src + (size_t)(first + r) * D + c * 8 : src;
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst + r * LD + c * 8)), "l"(s),
                     "r"(in ? 16 : 0));
    }
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }
// N floats from src[first ..] by 4-byte cp.async, zero-filled at or beyond `limit`.
template <int N>
__device__ __forceinline__ void load_floats_async(float* dst, const float* src, int first, int limit, int tid, int nthreads) {
    for (int e = tid; e < N; e += nthreads) {
        const bool in = first + e < limit;
        const float* s = in ? src + first + e : src;
        asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst + e)), "l"(s), "r"(in ? 4 : 0));
    }
}

// The key tiles a query block walks (the forward and dQ kernels): the sink slots [0, n_sink)
// first, then the keys [c_lo, c_hi); tile t covers columns c0 .. c0 + 64 of a part that ends at
// `to`. stage(t) makes tile t's K and V rows readable by the whole block: loaded in place (mma),
// or double-buffered (mma2: buffer t % 2 holds tile t, and tile t + 1 is copied by cp.async while
// tile t is computed; start() copies tile 0, done() ends a tile before its buffer is reused).
template <typename T, int D, int LD, bool V2>
struct KvTiles {
    const Params& p;
    const T *kb, *vb;
    T *ks, *vs;
    int c_lo, c_hi, n_sink_tiles, n;
    __device__ KvTiles(const Params& p_, const T* kb_, const T* vb_, T* ks_, T* vs_, int c_lo_, int c_hi_)
        : p(p_), kb(kb_), vb(vb_), ks(ks_), vs(vs_), c_lo(c_lo_), c_hi(c_hi_) {
        n_sink_tiles = (p.n_sink + TC_BC - 1) / TC_BC;
        n = n_sink_tiles + (c_hi - c_lo + TC_BC - 1) / TC_BC;
    }
    __device__ void at(int t, int& c0, int& to) const {
        c0 = t < n_sink_tiles ? t * TC_BC : c_lo + (t - n_sink_tiles) * TC_BC;
        to = t < n_sink_tiles ? p.n_sink : c_hi;
    }
    __device__ void copy_async(int t, int tid, int nth) const {
        int c0, to;
        at(t, c0, to);
        const int off = (t & 1) * TC_BC * LD;
        load_rows_async<T, D, LD>(ks + off, kb, c0, TC_BC, to, tid, nth);
        load_rows_async<T, D, LD>(vs + off, vb, c0, TC_BC, to, tid, nth);
    }
    __device__ void start(int tid, int nth) const {
        if (V2) {
            if (n > 0) copy_async(0, tid, nth);
            cp_async_commit();
        }
    }
    // Tile t: its first column, the end of its part, and its K and V rows in shared memory.
    struct Tile {
        int c0, to;
        const T *k, *v;
    };
    __device__ Tile stage(int t, int tid, int nth) const {
        Tile r;
        at(t, r.c0, r.to);
        if (V2) {
            if (t + 1 < n) copy_async(t + 1, tid, nth);
            cp_async_commit();
            cp_async_wait<1>();  // every group but the newest: tile t has landed
            __syncthreads();
            r.k = ks + (t & 1) * TC_BC * LD;
            r.v = vs + (t & 1) * TC_BC * LD;
        } else {
            __syncthreads();
            load_rows_ld<T, D, LD>(ks, kb, r.c0, TC_BC, r.to, tid, nth);
            load_rows_ld<T, D, LD>(vs, vb, r.c0, TC_BC, r.to, tid, nth);
            __syncthreads();
            r.k = ks;
            r.v = vs;
        }
        return r;
    }
    __device__ void done() const {
        if (V2) __syncthreads();
    }
};

// Forward. grid (ceil(Tq / 64), B * H), 128 threads; shared memory 3 * 64 * (D + 8) elements
// (mma2: 5 * 64 * (D + 8), the K and V tiles double-buffered).
template <typename T, int D, bool V2>
__device__ void fwd_mma_impl(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ o,
                        float* __restrict__ lse, Params p) {
    constexpr int LD = D + MMA_PAD;
    constexpr int NT = TC_BC / 8;  // 8-key tiles of S
    constexpr int DT = D / 8;      // 8-column tiles of O
    extern __shared__ __align__(128) unsigned char tc_smem[];
    T* qs = reinterpret_cast<T*>(tc_smem);  // TC_BR x LD
    T* ks = qs + TC_BR * LD;                // TC_BC x LD (mma2: two of them)
    T* vs = ks + (V2 ? 2 : 1) * TC_BC * LD;  // TC_BC x LD (mma2: two of them)
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, nth = blockDim.x;
    const int g = lane >> 2, t4 = lane & 3;
    const int bh = blockIdx.y, b = bh / p.H, h = bh % p.H, hk = h / (p.H / p.Hkv);
    const int i0 = blockIdx.x * TC_BR;
    const T* kb = k + (size_t)(b * p.Hkv + hk) * p.Tk * D;
    const T* vb = v + (size_t)(b * p.Hkv + hk) * p.Tk * D;
    load_rows_ld<T, D, LD>(qs, q + (size_t)bh * p.Tq * D, i0, TC_BR, p.Tq, tid, nth);
    __syncthreads();
    uint32_t qa[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) load_a<T, LD, V2>(qa[kk], qs, warp * 16, kk * 16, g, t4);
    float oacc[DT][4];
#pragma unroll
    for (int jd = 0; jd < DT; jd++) oacc[jd][0] = oacc[jd][1] = oacc[jd][2] = oacc[jd][3] = 0.f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;
    const int r0 = i0 + warp * 16 + g, r1 = r0 + 8;  // the lane's two query rows
    const bool live0 = r0 < p.Tq, live1 = r1 < p.Tq;
    const int qp0 = p.q_start + r0, qp1 = p.q_start + r1;
    const float sc = p.scale * LOG2E;
    const int qlo = p.q_start + i0, qhi = min(qlo + TC_BR, p.q_start + p.Tq) - 1;
    int c_lo, c_hi;
    key_range(p, qlo, qhi, c_lo, c_hi);
    KvTiles<T, D, LD, V2> kv(p, kb, vb, ks, vs, c_lo, c_hi);
    kv.start(tid, nth);
    for (int t = 0; t < kv.n; t++) {
        const auto [c0, to, kt, vt] = kv.stage(t, tid, nth);
        {
            float s[NT][4];
#pragma unroll
            for (int j = 0; j < NT; j++) {
                s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
                for (int kk = 0; kk < D / 16; kk++) {
                    uint32_t bk[2];
                    load_b_cols<T, LD, V2>(bk, kt, j * 8, kk * 16, g, t4);
                    mma16816<T>(s[j], qa[kk], bk);
                }
            }
            float mx0 = m0, mx1 = m1;
            // The mask only where the warp's 16 rows do not see the whole tile (warp-uniform).
            if (V2 && tile_visible(p, i0 + warp * 16, i0 + warp * 16 + 16, c0, c0 + TC_BC, to)) {
#pragma unroll
                for (int j = 0; j < NT; j++) {
#pragma unroll
                    for (int e = 0; e < 2; e++) {
                        s[j][e] *= sc;
                        s[j][2 + e] *= sc;
                        mx0 = fmaxf(mx0, s[j][e]);
                        mx1 = fmaxf(mx1, s[j][2 + e]);
                    }
                }
            } else {
#pragma unroll
                for (int j = 0; j < NT; j++) {
#pragma unroll
                    for (int e = 0; e < 2; e++) {
                        const int c = c0 + j * 8 + 2 * t4 + e;
                        const bool in = c < to;
                        s[j][e] = live0 && in && visible(p, qp0, c) ? s[j][e] * sc : -INFINITY;
                        s[j][2 + e] = live1 && in && visible(p, qp1, c) ? s[j][2 + e] * sc : -INFINITY;
                        mx0 = fmaxf(mx0, s[j][e]);
                        mx1 = fmaxf(mx1, s[j][2 + e]);
                    }
                }
            }
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffff, mx0, 1));
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffff, mx0, 2));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffff, mx1, 1));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffff, mx1, 2));
            const float corr0 = mx0 == -INFINITY ? 1.f : exp2f(m0 - mx0);
            const float corr1 = mx1 == -INFINITY ? 1.f : exp2f(m1 - mx1);
            float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
            for (int j = 0; j < NT; j++) {
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    s[j][e] = mx0 == -INFINITY ? 0.f : exp2f(s[j][e] - mx0);
                    s[j][2 + e] = mx1 == -INFINITY ? 0.f : exp2f(s[j][2 + e] - mx1);
                    sum0 += s[j][e];
                    sum1 += s[j][2 + e];
                }
            }
            sum0 += __shfl_xor_sync(0xffffffff, sum0, 1);
            sum0 += __shfl_xor_sync(0xffffffff, sum0, 2);
            sum1 += __shfl_xor_sync(0xffffffff, sum1, 1);
            sum1 += __shfl_xor_sync(0xffffffff, sum1, 2);
            l0 = l0 * corr0 + sum0;
            l1 = l1 * corr1 + sum1;
            m0 = mx0;
            m1 = mx1;
#pragma unroll
            for (int jd = 0; jd < DT; jd++) {
                oacc[jd][0] *= corr0;
                oacc[jd][1] *= corr0;
                oacc[jd][2] *= corr1;
                oacc[jd][3] *= corr1;
            }
            // O += P V: keys kk2·16 .. +16 are S tiles 2·kk2 and 2·kk2 + 1.
#pragma unroll
            for (int kk2 = 0; kk2 < TC_BC / 16; kk2++) {
                uint32_t pa[4];
                acc_to_a<T>(pa, s[2 * kk2], s[2 * kk2 + 1]);
#pragma unroll
                for (int jd = 0; jd < DT; jd++) {
                    uint32_t bv[2];
                    load_b_rows<T, LD, V2>(bv, vt, kk2 * 16, jd * 8, g, t4);
                    mma16816<T>(oacc[jd], pa, bv);
                }
            }
        }
        kv.done();
    }
    const float inv0 = l0 > 0.f ? 1.f / l0 : 0.f, inv1 = l1 > 0.f ? 1.f / l1 : 0.f;
#pragma unroll
    for (int jd = 0; jd < DT; jd++) {
        const int col = jd * 8 + 2 * t4;
        if (live0)
            *reinterpret_cast<uint32_t*>(o + ((size_t)bh * p.Tq + r0) * D + col) = pack2<T>(oacc[jd][0] * inv0, oacc[jd][1] * inv0);
        if (live1)
            *reinterpret_cast<uint32_t*>(o + ((size_t)bh * p.Tq + r1) * D + col) = pack2<T>(oacc[jd][2] * inv1, oacc[jd][3] * inv1);
    }
    if (t4 == 0) {
        if (live0) lse[(size_t)bh * p.Tq + r0] = l0 > 0.f ? m0 + log2f(l0) : -INFINITY;
        if (live1) lse[(size_t)bh * p.Tq + r1] = l1 > 0.f ? m1 + log2f(l1) : -INFINITY;
    }
}


// ---- Backward on mma.sync: the dK/dV and dQ kernels of bwd_dkv_tc / bwd_dq_tc (same grids, same
// f32 outputs) with S, P, dP and dS in registers. dK/dV: a warp owns 16 keys and walks each
// 64-query tile in two halves of 32 (so that dK, dV, S^T and dP^T fit in registers at d = 128);
// dQ: a warp owns 16 queries and walks key tiles of 64. A operands that are not accumulators
// (K_w, V_w, Q_w, dO_w) are read from shared memory at each use.

// The two products of a backward tile: s[j] = A1 B1^T and dp[j] = A2 B2^T, where A1, A2 are rows
// r .. r + 16 of the tiles a1, a2 and B1, B2 rows n0 + 8j .. n0 + 8j + 8 of b1, b2 (k over D).
template <typename T, int D, int LD, int N, bool V2>
__device__ __forceinline__ void two_products(float (*s)[4], float (*dp)[4], const T* a1, const T* a2, int r, const T* b1,
                                             const T* b2, int n0, int g, int t4) {
#pragma unroll
    for (int j = 0; j < N; j++) {
#pragma unroll
        for (int e = 0; e < 4; e++) s[j][e] = dp[j][e] = 0.f;
    }
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) {
        uint32_t x1[4], x2[4];
        load_a<T, LD, V2>(x1, a1, r, kk * 16, g, t4);
        load_a<T, LD, V2>(x2, a2, r, kk * 16, g, t4);
#pragma unroll
        for (int j = 0; j < N; j++) {
            uint32_t y1[2], y2[2];
            load_b_cols<T, LD, V2>(y1, b1, n0 + j * 8, kk * 16, g, t4);
            load_b_cols<T, LD, V2>(y2, b2, n0 + j * 8, kk * 16, g, t4);
            mma16816<T>(s[j], x1, y1);
            mma16816<T>(dp[j], x2, y2);
        }
    }
}

// dK, dV. grid (ceil(Tk / 64), B * Hkv), 128 threads; shared memory 4 * 64 * (D + 8) elements and
// 128 floats (mma2: 6 * 64 * (D + 8) and 256, the query-side tiles double-buffered).
template <typename T, int D, bool V2>
__device__ void bwd_dkv_mma_impl(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                            const T* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ dlt,
                            float* __restrict__ dk, float* __restrict__ dv, Params p) {
    constexpr int LD = D + MMA_PAD;
    constexpr int QH = 32;       // queries per half tile
    constexpr int NQ = QH / 8;   // 8-query tiles of S^T per half
    constexpr int DT = D / 8;
    extern __shared__ __align__(128) unsigned char tc_smem[];
    T* ks = reinterpret_cast<T*>(tc_smem);  // 64 x LD (this block's keys)
    T* vs = ks + TC_BC * LD;
    T* qs = vs + TC_BC * LD;                // 64 x LD (a query tile; mma2: two)
    T* dos = qs + (V2 ? 2 : 1) * TC_BR * LD;  // (mma2: two)
    // Per buffer: the query tile's 64 LSEs, then its 64 D_i.
    float* fl = reinterpret_cast<float*>(dos + (V2 ? 2 : 1) * TC_BR * LD);
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, nth = blockDim.x;
    const int g = lane >> 2, t4 = lane & 3;
    const int bk = blockIdx.y, b = bk / p.Hkv, hk = bk % p.Hkv, group = p.H / p.Hkv;
    const int c0 = blockIdx.x * TC_BC;
    load_rows_ld<T, D, LD>(ks, k + (size_t)bk * p.Tk * D, c0, TC_BC, p.Tk, tid, nth);
    load_rows_ld<T, D, LD>(vs, v + (size_t)bk * p.Tk * D, c0, TC_BC, p.Tk, tid, nth);
    float dka[DT][4], dva[DT][4];
#pragma unroll
    for (int jd = 0; jd < DT; jd++)
#pragma unroll
        for (int e = 0; e < 4; e++) dka[jd][e] = dva[jd][e] = 0.f;
    const float sc = p.scale * LOG2E;
    const int c_last = min(c0 + TC_BC, p.Tk) - 1;
    int i_lo = 0, i_hi = p.Tq;
    if (c0 >= p.n_sink) {
        const int kp_lo = p.k_start + c0 - p.n_sink, kp_hi = p.k_start + c_last - p.n_sink;
        i_lo = max(kp_lo - p.q_start, 0);
        if (p.window != 0) i_hi = min(p.Tq, kp_hi + p.window - p.q_start);
        i_hi = max(i_hi, i_lo);
    }
    const int kr = warp * 16;                  // the warp's first key row in the tile
    const int ck0 = c0 + kr + g, ck1 = ck0 + 8;  // the lane's two key columns
    // Query tiles: for each query head of the group, [i_lo, i_hi) in tiles of 64; tile u is head
    // u / n_q, rows i_lo + (u % n_q) * 64. mma2 double-buffers Q, dO, the LSEs and D_i (cp.async;
    // rows at or beyond Tq arrive as zeros, and every use of them is masked by i < Tq).
    const int n_q = (i_hi - i_lo + TC_BR - 1) / TC_BR, n_tiles = group * n_q;
    auto qtile = [&](int u, int& bh, int& i0) {
        bh = b * p.H + hk * group + u / n_q;
        i0 = i_lo + (u % n_q) * TC_BR;
    };
    if (V2) {
        if (n_tiles > 0) {
            int bh, i0;
            qtile(0, bh, i0);
            load_rows_async<T, D, LD>(qs, q + (size_t)bh * p.Tq * D, i0, TC_BR, p.Tq, tid, nth);
            load_rows_async<T, D, LD>(dos, dout + (size_t)bh * p.Tq * D, i0, TC_BR, p.Tq, tid, nth);
            load_floats_async<TC_BR>(fl, lse + (size_t)bh * p.Tq, i0, p.Tq, tid, nth);
            load_floats_async<TC_BR>(fl + TC_BR, dlt + (size_t)bh * p.Tq, i0, p.Tq, tid, nth);
        }
        cp_async_commit();
    }
    for (int u = 0; u < n_tiles; u++) {
        int bh, i0;
        qtile(u, bh, i0);
        const T* qt = qs;
        const T* dot = dos;
        const float* lsh = fl;
        const float* dlh = fl + TC_BR;
        if (V2) {
            if (u + 1 < n_tiles) {
                int bh1, i1;
                qtile(u + 1, bh1, i1);
                const int nb = (u + 1) & 1;
                load_rows_async<T, D, LD>(qs + nb * TC_BR * LD, q + (size_t)bh1 * p.Tq * D, i1, TC_BR, p.Tq, tid, nth);
                load_rows_async<T, D, LD>(dos + nb * TC_BR * LD, dout + (size_t)bh1 * p.Tq * D, i1, TC_BR, p.Tq, tid, nth);
                load_floats_async<TC_BR>(fl + nb * 2 * TC_BR, lse + (size_t)bh1 * p.Tq, i1, p.Tq, tid, nth);
                load_floats_async<TC_BR>(fl + nb * 2 * TC_BR + TC_BR, dlt + (size_t)bh1 * p.Tq, i1, p.Tq, tid, nth);
            }
            cp_async_commit();
            cp_async_wait<1>();
            __syncthreads();
            const int cb = u & 1;
            qt = qs + cb * TC_BR * LD;
            dot = dos + cb * TC_BR * LD;
            lsh = fl + cb * 2 * TC_BR;
            dlh = lsh + TC_BR;
        } else {
            __syncthreads();
            load_rows_ld<T, D, LD>(qs, q + (size_t)bh * p.Tq * D, i0, TC_BR, p.Tq, tid, nth);
            load_rows_ld<T, D, LD>(dos, dout + (size_t)bh * p.Tq * D, i0, TC_BR, p.Tq, tid, nth);
            for (int e = tid; e < TC_BR; e += nth) {
                const bool in = i0 + e < p.Tq;
                fl[e] = in ? lse[(size_t)bh * p.Tq + i0 + e] : -INFINITY;
                fl[TC_BR + e] = in ? dlt[(size_t)bh * p.Tq + i0 + e] : 0.f;
            }
            __syncthreads();
        }
        {
#pragma unroll 1
            for (int hq = 0; hq < TC_BR / QH; hq++) {
                const int qc = hq * QH;  // the half's first query row in the tile
                float s[NQ][4], dp[NQ][4];
                two_products<T, D, LD, NQ, V2>(s, dp, ks, vs, kr, qt, dot, qc, g, t4);  // S^T = K_w Q^T, dP^T = V_w dO^T
                // No mask where the half's 32 queries see all of the warp's 16 keys (warp-uniform).
                const bool full = V2 && tile_visible(p, i0 + qc, i0 + qc + QH, c0 + kr, c0 + kr + 16, p.Tk);
                // P^T and dS^T = P^T (dP^T - D_i), in place.
#pragma unroll
                for (int j = 0; j < NQ; j++) {
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        const int jq = qc + j * 8 + 2 * t4 + (e & 1), i = i0 + jq, c = e < 2 ? ck0 : ck1;
                        const float L = lsh[jq];
                        const bool ok = full || (c < p.Tk && i < p.Tq && L != -INFINITY && visible(p, p.q_start + i, c));
                        const float pv = ok ? exp2f(s[j][e] * sc - L) : 0.f;
                        s[j][e] = pv;
                        dp[j][e] = pv * (dp[j][e] - dlh[jq]);
                    }
                }
                // dV_w += P^T dO, dK_w += dS^T Q (k = the half's 32 queries).
#pragma unroll
                for (int kk2 = 0; kk2 < QH / 16; kk2++) {
                    uint32_t pa[4], da[4];
                    acc_to_a<T>(pa, s[2 * kk2], s[2 * kk2 + 1]);
                    acc_to_a<T>(da, dp[2 * kk2], dp[2 * kk2 + 1]);
#pragma unroll
                    for (int jd = 0; jd < DT; jd++) {
                        uint32_t bo[2], bq[2];
                        load_b_rows<T, LD, V2>(bo, dot, qc + kk2 * 16, jd * 8, g, t4);
                        load_b_rows<T, LD, V2>(bq, qt, qc + kk2 * 16, jd * 8, g, t4);
                        mma16816<T>(dva[jd], pa, bo);
                        mma16816<T>(dka[jd], da, bq);
                    }
                }
            }
        }
        if (V2) __syncthreads();
    }
#pragma unroll
    for (int jd = 0; jd < DT; jd++) {
        const int col = jd * 8 + 2 * t4;
        if (ck0 < p.Tk) {
            const size_t row = (size_t)bk * p.Tk + ck0;
            *reinterpret_cast<float2*>(dk + row * D + col) = make_float2(dka[jd][0] * p.scale, dka[jd][1] * p.scale);
            *reinterpret_cast<float2*>(dv + row * D + col) = make_float2(dva[jd][0], dva[jd][1]);
        }
        if (ck1 < p.Tk) {
            const size_t row = (size_t)bk * p.Tk + ck1;
            *reinterpret_cast<float2*>(dk + row * D + col) = make_float2(dka[jd][2] * p.scale, dka[jd][3] * p.scale);
            *reinterpret_cast<float2*>(dv + row * D + col) = make_float2(dva[jd][2], dva[jd][3]);
        }
    }
}

// dQ. grid (ceil(Tq / 64), B * H), 128 threads; shared memory 4 * 64 * (D + 8) elements and 128
// floats (mma2: 6 * 64 * (D + 8), K and V double-buffered).
template <typename T, int D, bool V2>
__device__ void bwd_dq_mma_impl(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                           const T* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ dlt,
                           float* __restrict__ dq, Params p) {
    constexpr int LD = D + MMA_PAD;
    constexpr int NT = TC_BC / 8;
    constexpr int DT = D / 8;
    extern __shared__ __align__(128) unsigned char tc_smem[];
    T* qs = reinterpret_cast<T*>(tc_smem);  // 64 x LD
    T* dos = qs + TC_BR * LD;
    T* ks = dos + TC_BR * LD;               // 64 x LD (a key tile; mma2: two)
    T* vs = ks + (V2 ? 2 : 1) * TC_BC * LD;  // (mma2: two)
    float* lq = reinterpret_cast<float*>(vs + (V2 ? 2 : 1) * TC_BC * LD);  // 64: lse of the block's rows
    float* dlq = lq + TC_BR;                                 // 64: D_i
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, nth = blockDim.x;
    const int g = lane >> 2, t4 = lane & 3;
    const int bh = blockIdx.y, b = bh / p.H, h = bh % p.H, hk = h / (p.H / p.Hkv);
    const int i0 = blockIdx.x * TC_BR;
    load_rows_ld<T, D, LD>(qs, q + (size_t)bh * p.Tq * D, i0, TC_BR, p.Tq, tid, nth);
    load_rows_ld<T, D, LD>(dos, dout + (size_t)bh * p.Tq * D, i0, TC_BR, p.Tq, tid, nth);
    for (int e = tid; e < TC_BR; e += nth) {
        const bool in = i0 + e < p.Tq;
        lq[e] = in ? lse[(size_t)bh * p.Tq + i0 + e] : -INFINITY;
        dlq[e] = in ? dlt[(size_t)bh * p.Tq + i0 + e] : 0.f;
    }
    const T* kb = k + (size_t)(b * p.Hkv + hk) * p.Tk * D;
    const T* vb = v + (size_t)(b * p.Hkv + hk) * p.Tk * D;
    float dqa[DT][4];
#pragma unroll
    for (int jd = 0; jd < DT; jd++) dqa[jd][0] = dqa[jd][1] = dqa[jd][2] = dqa[jd][3] = 0.f;
    const int qr = warp * 16;  // the warp's first query row in the tile
    const int r0 = i0 + qr + g, r1 = r0 + 8;
    const float sc = p.scale * LOG2E;
    const int qlo = p.q_start + i0, qhi = min(qlo + TC_BR, p.q_start + p.Tq) - 1;
    int c_lo, c_hi;
    key_range(p, qlo, qhi, c_lo, c_hi);
    __syncthreads();
    const float L0 = lq[qr + g], L1 = lq[qr + g + 8], D0 = dlq[qr + g], D1 = dlq[qr + g + 8];
    KvTiles<T, D, LD, V2> kv(p, kb, vb, ks, vs, c_lo, c_hi);
    kv.start(tid, nth);
    for (int t = 0; t < kv.n; t++) {
        const auto [c0, to, kt, vt] = kv.stage(t, tid, nth);
        {
            float s[NT][4], dp[NT][4];
            two_products<T, D, LD, NT, V2>(s, dp, qs, dos, qr, kt, vt, 0, g, t4);  // S = Q_w K^T, dP = dO_w V^T
            // No mask where the warp's 16 queries see the whole key tile (warp-uniform).
            const bool full = V2 && tile_visible(p, i0 + qr, i0 + qr + 16, c0, c0 + TC_BC, to);
#pragma unroll
            for (int j = 0; j < NT; j++) {
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int cc = c0 + j * 8 + 2 * t4 + (e & 1);
                    const bool row1 = e >= 2;
                    const int i = row1 ? r1 : r0;
                    const float L = row1 ? L1 : L0, Di = row1 ? D1 : D0;
                    const bool ok = full || (i < p.Tq && cc < to && L != -INFINITY && visible(p, p.q_start + i, cc));
                    const float pv = ok ? exp2f(s[j][e] * sc - L) : 0.f;
                    dp[j][e] = pv * (dp[j][e] - Di);
                }
            }
            // dQ_w += dS K (k = the tile's 64 keys).
#pragma unroll
            for (int kk2 = 0; kk2 < TC_BC / 16; kk2++) {
                uint32_t da[4];
                acc_to_a<T>(da, dp[2 * kk2], dp[2 * kk2 + 1]);
#pragma unroll
                for (int jd = 0; jd < DT; jd++) {
                    uint32_t bk2[2];
                    load_b_rows<T, LD, V2>(bk2, kt, kk2 * 16, jd * 8, g, t4);
                    mma16816<T>(dqa[jd], da, bk2);
                }
            }
        }
        kv.done();
    }
#pragma unroll
    for (int jd = 0; jd < DT; jd++) {
        const int col = jd * 8 + 2 * t4;
        if (r0 < p.Tq)
            *reinterpret_cast<float2*>(dq + ((size_t)bh * p.Tq + r0) * D + col) = make_float2(dqa[jd][0] * p.scale, dqa[jd][1] * p.scale);
        if (r1 < p.Tq)
            *reinterpret_cast<float2*>(dq + ((size_t)bh * p.Tq + r1) * D + col) = make_float2(dqa[jd][2] * p.scale, dqa[jd][3] * p.scale);
    }
}

// Two builds of the mma.sync kernels: mma (fragments from 32/16-bit shared loads, a mask on every
// tile: the kernels checked on the H200 at dc36ff4) and mma2 (fragments by ldmatrix, and no mask on
// the tiles a warp sees whole, `tile_visible`), selected at run time (ZOO_FLASH_MMA=2) until mma2
// has passed the same check.
template <typename T, int D>
__device__ void fwd_mma(const T* q, const T* k, const T* v, T* o, float* lse, Params p) {
    fwd_mma_impl<T, D, false>(q, k, v, o, lse, p);
}
template <typename T, int D>
__device__ void fwd_mma2(const T* q, const T* k, const T* v, T* o, float* lse, Params p) {
    fwd_mma_impl<T, D, true>(q, k, v, o, lse, p);
}
template <typename T, int D>
__device__ void bwd_dkv_mma(const T* q, const T* k, const T* v, const T* dout, const float* lse, const float* dlt,
                            float* dk, float* dv, Params p) {
    bwd_dkv_mma_impl<T, D, false>(q, k, v, dout, lse, dlt, dk, dv, p);
}
template <typename T, int D>
__device__ void bwd_dkv_mma2(const T* q, const T* k, const T* v, const T* dout, const float* lse, const float* dlt,
                             float* dk, float* dv, Params p) {
    bwd_dkv_mma_impl<T, D, true>(q, k, v, dout, lse, dlt, dk, dv, p);
}
template <typename T, int D>
__device__ void bwd_dq_mma(const T* q, const T* k, const T* v, const T* dout, const float* lse, const float* dlt,
                           float* dq, Params p) {
    bwd_dq_mma_impl<T, D, false>(q, k, v, dout, lse, dlt, dq, p);
}
template <typename T, int D>
__device__ void bwd_dq_mma2(const T* q, const T* k, const T* v, const T* dout, const float* lse, const float* dlt,
                            float* dq, Params p) {
    bwd_dq_mma_impl<T, D, true>(q, k, v, dout, lse, dlt, dq, p);
}

#define MMA_ALL(KIND, T, NAME)                                                                                \
    FWD_KERNEL(KIND, T, NAME, 32) FWD_KERNEL(KIND, T, NAME, 64) FWD_KERNEL(KIND, T, NAME, 96)                \
    FWD_KERNEL(KIND, T, NAME, 128) BWD_KERNELS(KIND, T, NAME, 32) BWD_KERNELS(KIND, T, NAME, 64)             \
    BWD_KERNELS(KIND, T, NAME, 96) BWD_KERNELS(KIND, T, NAME, 128)
MMA_ALL(mma, __nv_bfloat16, bf16)
MMA_ALL(mma, __half, f16)
MMA_ALL(mma2, __nv_bfloat16, bf16)
MMA_ALL(mma2, __half, f16)

// ---- Split-KV decoding (Flash-Decoding: Dao, Haziza, Massa and Sizov 2023) on CUDA cores ----
// A few query rows (decode steps: Tq <= 16) over a long cache. The forward kernels above give each
// (batch, head) one block that walks every key, so a one-query step over 4096 keys keeps a handful
// of blocks busy. Here the keys a kv head's rows may see are cut into `splits` chunks, one block
// per (chunk, batch x kv head, group of R rows); a block reads its K/V chunk once for all the query
// heads of the GQA group (rows r = g * Tq + i: head hk * G + g, query i), its 4 warps take the
// chunk's keys in turn (lanes over the head dim, element j * 32 + lane, so a warp reads a key row
// in coalesced 32-element pieces), each warp keeping an online softmax per row, merged in shared
// memory at the end. The block writes its rows' unnormalised output and (max, sum) in base 2 to a
// workspace; `dec_combine` merges the chunks (one warp per row) into O and the LSE of the other
// forward kernels, so the backward kernels serve this forward unchanged.
//
// K and V may be views of a larger cache (B, Hkv, capacity, D) narrowed to Tk rows: their batch,
// head and row strides come in DecParams (elements; the head dim is contiguous), so a decode step
// does not copy the cache. Virtual column u < n_sink is sink slot u; u >= n_sink is key column
// c_lo + u - n_sink, so keys outside every row's window or causal range are never read.
#define DEC_WARPS 4

struct DecParams {
    Params p;
    long long kb, kh, kr;  // K strides (elements) of batch, kv head and row
    long long vb, vh, vr;  // V strides
    int c_lo, n_cols;      // the virtual columns (above)
    int chunk, splits;     // virtual columns per split, and their number
};

// Rows per block R, a template parameter: 1, 2, 4 or 8 (at head dims >= 192 at most 4: the
// registers of R rows of q and of the accumulator per lane), the smallest that holds a kv head's
// G * Tq rows (decode_plan in attention.rs). Registers set the occupancy: with R = 8 a block held
// 8 rows of q and of the accumulator whatever the number of live rows, and a one-query step of a
// plain multi-head model (one live row) kept about 20 warps per SM where R = 1 fits far more.

template <typename T, int D>
__device__ __forceinline__ void dec_load(float* dst, const T* row, int lane) {
#pragma unroll
    for (int j = 0; j < D / 32; j++) dst[j] = to_f(row[j * 32 + lane]);
}

// grid (splits, B * Hkv, ceil(G * Tq / R)), DEC_WARPS * 32 threads. part_o (splits, B * H * Tq, D)
// f32, part_ml (splits, B * H * Tq, 2) f32, rows in (b, hk, g, i) order (= (b, h, i)).
template <typename T, int D, int R>
__device__ void dec_split(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                          float* __restrict__ part_o, float* __restrict__ part_ml, DecParams dp) {
    constexpr int E = D / 32;
    const Params& p = dp.p;
    __shared__ float s_acc[DEC_WARPS][R][D];
    __shared__ float s_m[DEC_WARPS][R], s_l[DEC_WARPS][R];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int split = blockIdx.x, bk = blockIdx.y, b = bk / p.Hkv, hk = bk % p.Hkv;
    const int G = p.H / p.Hkv, rows = G * p.Tq, r0 = blockIdx.z * R;
    // Live rows of this block: with one query of a plain multi-head model (G = Tq = 1) only the
    // first of its R rows; the others are skipped per key, not paid for with a dot product and a
    // warp reduction each.
    const int n_live = min(R, rows - r0);
    const float qscale = p.scale * LOG2E;
    float qr[R][E], acc[R][E], m[R], l[R];
    int qpos[R];
#pragma unroll
    for (int r = 0; r < R; r++) {
        const int rr = r0 + r;
        const bool live = rr < rows;
        // Row rr of this kv head: head hk * G + rr / Tq, query rr % Tq; q is contiguous (B, H, Tq, D).
        const T* qrow = q + ((size_t)bk * rows + (live ? rr : 0)) * D;
#pragma unroll
        for (int j = 0; j < E; j++) { qr[r][j] = live ? to_f(qrow[j * 32 + lane]) * qscale : 0.f; acc[r][j] = 0.f; }
        m[r] = -INFINITY;
        l[r] = 0.f;
        qpos[r] = live ? p.q_start + rr % p.Tq : INT_MIN;  // INT_MIN: a dead row sees nothing
    }
    const T* kbase = k + b * dp.kb + hk * dp.kh;
    const T* vbase = v + b * dp.vb + hk * dp.vh;
    const int u_end = min((split + 1) * dp.chunk, dp.n_cols);
    auto col = [&](int u) { return u < p.n_sink ? u : dp.c_lo + u - p.n_sink; };
    // Each warp takes keys u = first + warp, + DEC_WARPS, ...; the next key's K and V rows are
    // loaded before the current one is used (two rows in flight per warp).
    int u = split * dp.chunk + warp;
    float kn[E], vn[E];
    if (u < u_end) {
        dec_load<T, D>(kn, kbase + col(u) * dp.kr, lane);
        dec_load<T, D>(vn, vbase + col(u) * dp.vr, lane);
    }
    for (; u < u_end; u += DEC_WARPS) {
        float kc[E], vc[E];
#pragma unroll
        for (int j = 0; j < E; j++) { kc[j] = kn[j]; vc[j] = vn[j]; }
        const int c = col(u);
        if (u + DEC_WARPS < u_end) {
            dec_load<T, D>(kn, kbase + col(u + DEC_WARPS) * dp.kr, lane);
            dec_load<T, D>(vn, vbase + col(u + DEC_WARPS) * dp.vr, lane);
        }
#pragma unroll
        for (int r = 0; r < R; r++) {
            if (r >= n_live) break;
            float s = 0.f;
#pragma unroll
            for (int j = 0; j < E; j++) s += qr[r][j] * kc[j];
            s = warp_sum(s);
            // qpos INT_MIN (a dead row) fails every test of `visible` but the sinks': check it first.
            if (qpos[r] == INT_MIN || !visible(p, qpos[r], c)) continue;
            const float mn = fmaxf(m[r], s);
            const float corr = exp2f(m[r] - mn), pj = exp2f(s - mn);
            l[r] = l[r] * corr + pj;
#pragma unroll
            for (int j = 0; j < E; j++) acc[r][j] = acc[r][j] * corr + pj * vc[j];
            m[r] = mn;
        }
    }
#pragma unroll
    for (int r = 0; r < R; r++) {
#pragma unroll
        for (int j = 0; j < E; j++) s_acc[warp][r][j * 32 + lane] = acc[r][j];
        if (lane == 0) { s_m[warp][r] = m[r]; s_l[warp][r] = l[r]; }
    }
    __syncthreads();
    // Merge the warps: row r's max M over the warps, sum L = sum_w l_w 2^(m_w - M), O likewise.
    const size_t total = (size_t)p.B * p.H * p.Tq;
    for (int e = threadIdx.x; e < R * D; e += DEC_WARPS * 32) {
        const int r = e / D, x = e % D;
        if (r0 + r >= rows) break;
        float mx = -INFINITY;
#pragma unroll
        for (int w = 0; w < DEC_WARPS; w++) mx = fmaxf(mx, s_m[w][r]);
        float o = 0.f, sum = 0.f;
        if (mx != -INFINITY) {
#pragma unroll
            for (int w = 0; w < DEC_WARPS; w++) {
                const float f = exp2f(s_m[w][r] - mx);
                o += s_acc[w][r][x] * f;
                sum += s_l[w][r] * f;
            }
        }
        const size_t row = (size_t)bk * rows + r0 + r;
        part_o[((size_t)split * total + row) * D + x] = o;
        if (x == 0) {
            part_ml[((size_t)split * total + row) * 2] = mx;
            part_ml[((size_t)split * total + row) * 2 + 1] = sum;
        }
    }
}

// grid (ceil(B * H * Tq / DEC_WARPS)), DEC_WARPS * 32 threads: a warp per row merges the splits
// into O (B, H, Tq, D) in T and the row's LSE (base 2; -inf and O = 0 for a row that sees nothing).
template <typename T, int D>
__device__ void dec_combine(const float* __restrict__ part_o, const float* __restrict__ part_ml, T* __restrict__ o,
                            float* __restrict__ lse, DecParams dp) {
    const Params& p = dp.p;
    const size_t total = (size_t)p.B * p.H * p.Tq;
    const size_t row = (size_t)blockIdx.x * DEC_WARPS + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= total) return;
    float mx = -INFINITY;
    for (int s = lane; s < dp.splits; s += 32) mx = fmaxf(mx, part_ml[((size_t)s * total + row) * 2]);
    mx = warp_max(mx);
    float sum = 0.f;
    if (mx != -INFINITY)
        for (int s = lane; s < dp.splits; s += 32) {
            const float ms = part_ml[((size_t)s * total + row) * 2];
            sum += part_ml[((size_t)s * total + row) * 2 + 1] * exp2f(ms - mx);
        }
    sum = warp_sum(sum);
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    for (int x = lane; x < D; x += 32) {
        float acc = 0.f;
        if (sum > 0.f)
            for (int s = 0; s < dp.splits; s++) {
                const float ms = part_ml[((size_t)s * total + row) * 2];
                if (ms != -INFINITY) acc += part_o[((size_t)s * total + row) * D + x] * exp2f(ms - mx);
            }
        o[row * D + x] = from_f<T>(acc * inv);
    }
    if (lane == 0) lse[row] = sum > 0.f ? mx + log2f(sum) : -INFINITY;
}

#define DEC_SPLIT(T, NAME, D, R)                                                                          \
    extern "C" __global__ void __launch_bounds__(DEC_WARPS * 32) zoo_flash_dec_split_##NAME##_##D##_r##R( \
        const T* q, const T* k, const T* v, float* part_o, float* part_ml, DecParams dp) {                \
        dec_split<T, D, R>(q, k, v, part_o, part_ml, dp);                                                 \
    }
#define DEC_COMBINE(T, NAME, D)                                                                           \
    extern "C" __global__ void __launch_bounds__(DEC_WARPS * 32) zoo_flash_dec_combine_##NAME##_##D(     \
        const float* part_o, const float* part_ml, T* o, float* lse, DecParams dp) {                      \
        dec_combine<T, D>(part_o, part_ml, o, lse, dp);                                                   \
    }
// Head dims up to 128 take R = 1, 2, 4, 8; 192 and 256 up to 4.
#define DEC_KERNELS(T, NAME, D)                                                                           \
    DEC_SPLIT(T, NAME, D, 1) DEC_SPLIT(T, NAME, D, 2) DEC_SPLIT(T, NAME, D, 4) DEC_SPLIT(T, NAME, D, 8)    \
    DEC_COMBINE(T, NAME, D)
#define DEC_KERNELS_WIDE(T, NAME, D)                                                                      \
    DEC_SPLIT(T, NAME, D, 1) DEC_SPLIT(T, NAME, D, 2) DEC_SPLIT(T, NAME, D, 4) DEC_COMBINE(T, NAME, D)
#define DEC_ALL(T, NAME)                                                                                  \
    DEC_KERNELS(T, NAME, 32) DEC_KERNELS(T, NAME, 64) DEC_KERNELS(T, NAME, 96)                            \
    DEC_KERNELS(T, NAME, 128) DEC_KERNELS_WIDE(T, NAME, 192) DEC_KERNELS_WIDE(T, NAME, 256)
DEC_ALL(float, f32)
DEC_ALL(__nv_bfloat16, bf16)
DEC_ALL(__half, f16)
