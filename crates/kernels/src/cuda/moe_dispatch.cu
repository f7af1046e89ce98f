// The data movement of grouped MoE dispatch (see moe_dispatch.rs): a gathered, weighted sum of
// rows and a gathered dot product, each one pass in place of candle's cat + index_select +
// broadcast_mul + sum. f32 sums, j in ascending order (the result does not depend on the launch);
// elements f32, bf16 or f16.
#include "convert.cuh"
#include "warp.cuh"

// out (M, d): out[i, x] = sum_j c_ij src[idx[i m + j], x] over the j whose index is below n_src;
// c_ij = 1 (mode 0), w[i m + j] (mode 1), or w[widx[i m + j]], 0 when that is not below n_w (mode 2).
template <typename T>
__device__ void gather_sum(const T* __restrict__ src, const unsigned* __restrict__ idx, const T* __restrict__ w,
                           const unsigned* __restrict__ widx, T* __restrict__ out, long long M, int m, int d,
                           unsigned n_src, unsigned n_w, int mode) {
    const long long total = M * d;
    for (long long e = (long long)blockIdx.x * blockDim.x + threadIdx.x; e < total; e += (long long)gridDim.x * blockDim.x) {
        const long long i = e / d;
        const int x = (int)(e - i * d);
        float acc = 0.f;
        for (int j = 0; j < m; j++) {
            const unsigned r = idx[i * m + j];
            if (r >= n_src) continue;
            float c = 1.f;
            if (mode == 1) {
                c = to_f(w[i * m + j]);
            } else if (mode == 2) {
                const unsigned a = widx[i * m + j];
                c = a < n_w ? to_f(w[a]) : 0.f;
            }
            acc += c * to_f(src[(long long)r * d + x]);
        }
        out[e] = from_f<T>(acc);
    }
}

// out (n_out,): out[i] = <a[i / k], b[idx[i]]> over d (0 when idx[i] is not below n_b); a warp per
// output, lanes over d.
template <typename T>
__device__ void gather_dot(const T* __restrict__ a, const T* __restrict__ b, const unsigned* __restrict__ idx,
                           T* __restrict__ out, long long n_out, int k, int d, unsigned n_b) {
    const long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    const int lane = threadIdx.x % 32;
    if (i >= n_out) return;
    const unsigned r = idx[i];
    float s = 0.f;
    if (r < n_b) {
        const T* ar = a + (i / k) * d;
        const T* br = b + (long long)r * d;
        for (int x = lane; x < d; x += 32) s += to_f(ar[x]) * to_f(br[x]);
    }
    s = warp_sum(s);
    if (lane == 0) out[i] = from_f<T>(s);
}

#define MOE_DISPATCH(T, NAME)                                                                                  \
    extern "C" __global__ void zoo_moe_gather_sum_##NAME(const T* src, const unsigned* idx, const T* w,        \
                                                         const unsigned* widx, T* out, long long M, int m,     \
                                                         int d, unsigned n_src, unsigned n_w, int mode) {      \
        gather_sum<T>(src, idx, w, widx, out, M, m, d, n_src, n_w, mode);                                      \
    }                                                                                                          \
    extern "C" __global__ void zoo_moe_gather_dot_##NAME(const T* a, const T* b, const unsigned* idx, T* out,  \
                                                         long long n_out, int k, int d, unsigned n_b) {        \
        gather_dot<T>(a, b, idx, out, n_out, k, d, n_b);                                                       \
    }
MOE_DISPATCH(float, f32)
MOE_DISPATCH(__nv_bfloat16, bf16)
MOE_DISPATCH(__half, f16)
