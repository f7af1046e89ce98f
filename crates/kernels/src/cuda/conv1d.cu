// Depthwise causal convolution over time with an optional SiLU, forward and backward (see
// conv1d.rs for the math). x, g, y, dx: (B, T, C) rows of C channels, in the element type T;
// w: (C, K) f32. The pre-activation p = conv(x) is recomputed where the backward needs it.
#include "convert.cuh"

#define CONV_THREADS 256
#define MAX_K 16

__device__ __forceinline__ float sigmoidf_(float p) { return 1.f / (1.f + __expf(-p)); }

// p[b, t, c] = Σ_j w[c, j] · x[b, t − K + 1 + j, c] (zero before the start of the sequence).
template <typename T>
__device__ __forceinline__ float pre(const T* __restrict__ x, const float* __restrict__ w, size_t row0, int t, int c,
                                     int C, int K) {
    float p = 0.f;
    for (int j = 0; j < K; ++j) {
        const int s = t - K + 1 + j;
        if (s >= 0) p = fmaf(w[c * K + j], to_f(x[(row0 + s) * C + c]), p);
    }
    return p;
}

// dL/dp at (b, t, c): g itself, or g · silu'(p).
template <typename T>
__device__ __forceinline__ float gpre(const T* __restrict__ x, const float* __restrict__ w, const T* __restrict__ g,
                                      size_t row0, int t, int c, int C, int K, int silu) {
    const float gv = to_f(g[(row0 + t) * C + c]);
    if (!silu) return gv;
    const float p = pre(x, w, row0, t, c, C, K);
    const float s = sigmoidf_(p);
    return gv * s * (1.f + p * (1.f - s));
}

template <typename T>
__device__ void conv_fwd(const T* __restrict__ x, const float* __restrict__ w, T* __restrict__ y, int B, int Tn, int C,
                         int K, int silu) {
    const size_t n = (size_t)B * Tn * C;
    for (size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += (size_t)gridDim.x * blockDim.x) {
        const int c = e % C;
        const size_t row = e / C;
        const int t = row % Tn;
        const size_t row0 = row - t;
        float p = pre(x, w, row0, t, c, C, K);
        if (silu) p = p * sigmoidf_(p);
        y[e] = from_f<T>(p);
    }
}

// dx[b, s, c] = Σ_j w[c, j] · gp[b, s + K − 1 − j, c] (terms past the end of the sequence are 0).
template <typename T>
__device__ void conv_dx(const T* __restrict__ x, const float* __restrict__ w, const T* __restrict__ g, T* __restrict__ dx,
                        int B, int Tn, int C, int K, int silu) {
    const size_t n = (size_t)B * Tn * C;
    for (size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += (size_t)gridDim.x * blockDim.x) {
        const int c = e % C;
        const size_t row = e / C;
        const int s = row % Tn;
        const size_t row0 = row - s;
        float acc = 0.f;
        for (int j = 0; j < K; ++j) {
            const int t = s + K - 1 - j;
            if (t < Tn) acc = fmaf(w[c * K + j], gpre(x, w, g, row0, t, c, C, K, silu), acc);
        }
        dx[e] = from_f<T>(acc);
    }
}

// part[chunk, c, j] = Σ_{rows of the chunk} gp[row, c] · x[row − K + 1 + j, c] (same sequence):
// grid (channel tiles, chunks); the caller sums over chunks.
template <typename T>
__device__ void conv_dw(const T* __restrict__ x, const float* __restrict__ w, const T* __restrict__ g,
                        float* __restrict__ part, int B, int Tn, int C, int K, int silu, int rows_per_chunk) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    const size_t rows = (size_t)B * Tn;
    const size_t r0 = (size_t)blockIdx.y * rows_per_chunk;
    const size_t r1 = min(rows, r0 + rows_per_chunk);
    float acc[MAX_K];
#pragma unroll
    for (int j = 0; j < MAX_K; ++j) acc[j] = 0.f;
    for (size_t row = r0; row < r1; ++row) {
        const int t = row % Tn;
        const size_t row0 = row - t;
        const float gp = gpre(x, w, g, row0, t, c, C, K, silu);
#pragma unroll
        for (int j = 0; j < MAX_K; ++j) {
            const int s = t - K + 1 + j;
            if (j < K && s >= 0) acc[j] = fmaf(gp, to_f(x[(row0 + s) * C + c]), acc[j]);
        }
    }
    float* out = part + ((size_t)blockIdx.y * C + c) * K;
    for (int j = 0; j < K; ++j) out[j] = acc[j];
}

#define CONV(T, NAME)                                                                                                 \
    extern "C" __global__ void __launch_bounds__(CONV_THREADS) zoo_conv_fwd_##NAME(                                  \
        const T* x, const float* w, T* y, int B, int Tn, int C, int K, int silu) {                                    \
        conv_fwd<T>(x, w, y, B, Tn, C, K, silu);                                                                      \
    }                                                                                                                 \
    extern "C" __global__ void __launch_bounds__(CONV_THREADS) zoo_conv_dx_##NAME(                                   \
        const T* x, const float* w, const T* g, T* dx, int B, int Tn, int C, int K, int silu) {                       \
        conv_dx<T>(x, w, g, dx, B, Tn, C, K, silu);                                                                   \
    }                                                                                                                 \
    extern "C" __global__ void __launch_bounds__(CONV_THREADS) zoo_conv_dw_##NAME(                                   \
        const T* x, const float* w, const T* g, float* part, int B, int Tn, int C, int K, int silu, int rows_per_chunk) { \
        conv_dw<T>(x, w, g, part, B, Tn, C, K, silu, rows_per_chunk);                                                 \
    }
CONV(float, f32)
CONV(__nv_bfloat16, bf16)
CONV(__half, f16)
