// RMS normalisation over the last dim with a gain, forward and backward (see rms_norm.rs): one
// warp per row for the forward and dx (x, y, g, dx of the element type T; gain and the saved
// r = 1/sqrt(mean(x²) + eps) in f32), and the gain's gradient as per-chunk column sums.
#include "convert.cuh"
#include "warp.cuh"

#define NORM_THREADS 256

template <typename T>
__device__ void norm_fwd(const T* __restrict__ x, const float* __restrict__ gain, T* __restrict__ y, float* __restrict__ r,
                         int n, int d, float eps) {
    const int lane = threadIdx.x % 32, warps = blockDim.x / 32;
    for (int row = blockIdx.x * warps + threadIdx.x / 32; row < n; row += gridDim.x * warps) {
        const T* xr = x + (size_t)row * d;
        float ss = 0.f;
        for (int j = lane; j < d; j += 32) {
            const float v = to_f(xr[j]);
            ss = fmaf(v, v, ss);
        }
        const float rr = rsqrtf(warp_sum(ss) / d + eps);
        T* yr = y + (size_t)row * d;
        for (int j = lane; j < d; j += 32) yr[j] = from_f<T>(to_f(xr[j]) * rr * gain[j]);
        if (lane == 0) r[row] = rr;
    }
}

// dx = r·u − x·r³·(Σ u⊙x)/d with u = g ⊙ gain.
template <typename T>
__device__ void norm_dx(const T* __restrict__ x, const float* __restrict__ gain, const T* __restrict__ g,
                        const float* __restrict__ r, T* __restrict__ dx, int n, int d) {
    const int lane = threadIdx.x % 32, warps = blockDim.x / 32;
    for (int row = blockIdx.x * warps + threadIdx.x / 32; row < n; row += gridDim.x * warps) {
        const T* xr = x + (size_t)row * d;
        const T* gr = g + (size_t)row * d;
        float dot = 0.f;
        for (int j = lane; j < d; j += 32) dot = fmaf(to_f(gr[j]) * gain[j], to_f(xr[j]), dot);
        dot = warp_sum(dot);
        const float rr = r[row], c = rr * rr * rr * dot / d;
        T* dr = dx + (size_t)row * d;
        for (int j = lane; j < d; j += 32) dr[j] = from_f<T>(rr * to_f(gr[j]) * gain[j] - to_f(xr[j]) * c);
    }
}

// part[chunk, j] = Σ_{rows of the chunk} g[row, j] · x[row, j] · r[row]; grid (column tiles, chunks).
template <typename T>
__device__ void norm_dw(const T* __restrict__ x, const T* __restrict__ g, const float* __restrict__ r,
                        float* __restrict__ part, int n, int d, int rows_per_chunk) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= d) return;
    const int r0 = blockIdx.y * rows_per_chunk, r1 = min(n, r0 + rows_per_chunk);
    float acc = 0.f;
    for (int row = r0; row < r1; ++row) acc = fmaf(to_f(g[(size_t)row * d + j]) * to_f(x[(size_t)row * d + j]), r[row], acc);
    part[(size_t)blockIdx.y * d + j] = acc;
}

#define NORM(T, NAME)                                                                                              \
    extern "C" __global__ void __launch_bounds__(NORM_THREADS) zoo_rms_fwd_##NAME(                                \
        const T* x, const float* gain, T* y, float* r, int n, int d, float eps) {                                  \
        norm_fwd<T>(x, gain, y, r, n, d, eps);                                                                     \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(NORM_THREADS) zoo_rms_dx_##NAME(                                 \
        const T* x, const float* gain, const T* g, const float* r, T* dx, int n, int d) {                          \
        norm_dx<T>(x, gain, g, r, dx, n, d);                                                                       \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(NORM_THREADS) zoo_rms_dw_##NAME(                                 \
        const T* x, const T* g, const float* r, float* part, int n, int d, int rows_per_chunk) {                   \
        norm_dw<T>(x, g, r, part, n, d, rows_per_chunk);                                                           \
    }
NORM(float, f32)
NORM(__nv_bfloat16, bf16)
NORM(__half, f16)
