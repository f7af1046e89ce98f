// Gated linear recurrence, one time step after another with the state in registers (fla's
// fused_recurrent layout): see linear_scan.rs for the math and the four passes built from these
// two kernels.
//
// Both kernels run X_t = Diag(A_t) X_prev + l_t r_tᵀ over time (forward, A_t = exp(g_t); or
// reverse, A = exp(g_{t+1})), X of (dk, dv) per (batch, head), and write one output per step:
//   scan_col: out_t[j] = Σ_i X[i, j] m_t[i]   (a thread owns column j, 32 rows i of one K tile)
//   scan_row: out_t[i] = Σ_j X[i, j] m_t[j]   (a thread owns row i, 32 columns j of one V tile)
// l, m of the col kernel and l of the row kernel are K-wide (dk), r (and the row kernel's m)
// V-wide (dv). Every tensor is f32 rows of T steps per (batch·head), with its own row stride
// (q may be the first dk columns of a [q | g] row). Each block writes its partial output for
// its tile of the summed dimension to out[tile][bh][t][·]; the caller sums the tiles, so the
// result does not depend on scheduling.
//
// Gate: gw = 0 (none, A = 1), 1 (one log-decay per head and step), or dk (one per key channel).

#define TT 32      // time steps staged in shared memory at once
#define OWN 64     // threads per block: owned columns (col) or rows (row)
#define REG 32     // state entries per thread (rows of a K tile, or columns of a V tile)

struct Scan {
    const float* l; int ls;
    const float* r; int rs;
    const float* m; int ms;
    const float* g; int gs; int gw;
    float* out;
    int bh, t, dk, dv, forward;
};

__device__ __forceinline__ int step_time(const Scan& p, int s) { return p.forward ? s : p.t - 1 - s; }

// The decay applied at time t (to the state carried from the previous step of the scan).
__device__ __forceinline__ float decay(const Scan& p, const float* gb, int t, int channel) {
    int tg = p.forward ? t : t + 1;
    if (p.gw == 0 || tg >= p.t) return 1.0f;
    return __expf(gb[(size_t)tg * p.gs + (p.gw == 1 ? 0 : channel)]);
}

extern "C" __global__ void zoo_scan_col(Scan p) {
    __shared__ float sl[TT][REG], sm[TT][REG], sa[TT][REG], sr[TT][OWN];
    const int bh = blockIdx.x, j0 = blockIdx.y * OWN, k0 = blockIdx.z * REG;
    const int j = j0 + threadIdx.x, kn = min(REG, p.dk - k0), jn = min(OWN, p.dv - j0);
    const float* lb = p.l + (size_t)bh * p.t * p.ls;
    const float* rb = p.r + (size_t)bh * p.t * p.rs;
    const float* mb = p.m + (size_t)bh * p.t * p.ms;
    const float* gb = p.g ? p.g + (size_t)bh * p.t * p.gs : nullptr;
    float* ob = p.out + ((size_t)blockIdx.z * p.bh + bh) * p.t * p.dv;
    float x[REG];
#pragma unroll
    for (int i = 0; i < REG; ++i) x[i] = 0.0f;
    for (int base = 0; base < p.t; base += TT) {
        const int n = min(TT, p.t - base);
        __syncthreads();
        for (int e = threadIdx.x; e < TT * REG; e += OWN) {
            const int s = e / REG, i = e % REG;
            float lv = 0.0f, mv = 0.0f, av = 1.0f;
            if (s < n && i < kn) {
                const int t = step_time(p, base + s);
                lv = lb[(size_t)t * p.ls + k0 + i];
                mv = mb[(size_t)t * p.ms + k0 + i];
                av = decay(p, gb, t, k0 + i);
            }
            sl[s][i] = lv; sm[s][i] = mv; sa[s][i] = av;
        }
        for (int e = threadIdx.x; e < TT * OWN; e += OWN) {
            const int s = e / OWN, c = e % OWN;
            sr[s][c] = (s < n && c < jn) ? rb[(size_t)step_time(p, base + s) * p.rs + j0 + c] : 0.0f;
        }
        __syncthreads();
        if (threadIdx.x < jn) {
            for (int s = 0; s < n; ++s) {
                const float rv = sr[s][threadIdx.x];
                float acc = 0.0f;
#pragma unroll
                for (int i = 0; i < REG; ++i) {
                    x[i] = fmaf(x[i], sa[s][i], sl[s][i] * rv);
                    acc = fmaf(x[i], sm[s][i], acc);
                }
                ob[(size_t)step_time(p, base + s) * p.dv + j] = acc;
            }
        }
    }
}

extern "C" __global__ void zoo_scan_row(Scan p) {
    __shared__ float sl[TT][OWN], sa[TT][OWN], sr[TT][REG], sm[TT][REG];
    const int bh = blockIdx.x, i0 = blockIdx.y * OWN, v0 = blockIdx.z * REG;
    const int i = i0 + threadIdx.x, in_ = min(OWN, p.dk - i0), vn = min(REG, p.dv - v0);
    const float* lb = p.l + (size_t)bh * p.t * p.ls;
    const float* rb = p.r + (size_t)bh * p.t * p.rs;
    const float* mb = p.m + (size_t)bh * p.t * p.ms;
    const float* gb = p.g ? p.g + (size_t)bh * p.t * p.gs : nullptr;
    float* ob = p.out + ((size_t)blockIdx.z * p.bh + bh) * p.t * p.dk;
    float x[REG];
#pragma unroll
    for (int c = 0; c < REG; ++c) x[c] = 0.0f;
    for (int base = 0; base < p.t; base += TT) {
        const int n = min(TT, p.t - base);
        __syncthreads();
        for (int e = threadIdx.x; e < TT * OWN; e += OWN) {
            const int s = e / OWN, c = e % OWN;
            float lv = 0.0f, av = 1.0f;
            if (s < n && c < in_) {
                const int t = step_time(p, base + s);
                lv = lb[(size_t)t * p.ls + i0 + c];
                av = decay(p, gb, t, i0 + c);
            }
            sl[s][c] = lv; sa[s][c] = av;
        }
        for (int e = threadIdx.x; e < TT * REG; e += OWN) {
            const int s = e / REG, c = e % REG;
            float rv = 0.0f, mv = 0.0f;
            if (s < n && c < vn) {
                const int t = step_time(p, base + s);
                rv = rb[(size_t)t * p.rs + v0 + c];
                mv = mb[(size_t)t * p.ms + v0 + c];
            }
            sr[s][c] = rv; sm[s][c] = mv;
        }
        __syncthreads();
        if (threadIdx.x < in_) {
            for (int s = 0; s < n; ++s) {
                const float lv = sl[s][threadIdx.x], av = sa[s][threadIdx.x];
                float acc = 0.0f;
#pragma unroll
                for (int c = 0; c < REG; ++c) {
                    x[c] = fmaf(x[c], av, lv * sr[s][c]);
                    acc = fmaf(x[c], sm[s][c], acc);
                }
                ob[(size_t)step_time(p, base + s) * p.dk + i] = acc;
            }
        }
    }
}

// out[x] = Σ_z part[z][x], in a fixed order.
extern "C" __global__ void zoo_scan_sum(const float* part, float* out, long long n, int tiles) {
    for (long long x = (long long)blockIdx.x * blockDim.x + threadIdx.x; x < n; x += (long long)gridDim.x * blockDim.x) {
        float s = 0.0f;
        for (int z = 0; z < tiles; ++z) s += part[(size_t)z * n + x];
        out[x] = s;
    }
}
