// Cross-entropy over rows of logits without materialising the softmax: the forward writes each
// row's negative log-likelihood and log-sum-exp (f32); the backward writes
// dlogits[i, j] = g[i] * (exp(x[i, j] - lse[i]) - [j == t[i]]) in the logits' type. One block per row.
#include "convert.cuh"
#include <stdint.h>

#define CE_THREADS 256


// Block-wide reduction (max or sum) of one float per thread.
template <bool MAX>
__device__ float block_reduce(float x, float* shared) {
    for (int o = 16; o > 0; o >>= 1) {
        const float y = __shfl_xor_sync(0xffffffff, x, o);
        x = MAX ? fmaxf(x, y) : x + y;
    }
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();
    if (lane == 0) shared[warp] = x;
    __syncthreads();
    x = lane < blockDim.x / 32 ? shared[lane] : (MAX ? -INFINITY : 0.f);
    if (warp == 0) {
        for (int o = 16; o > 0; o >>= 1) {
            const float y = __shfl_xor_sync(0xffffffff, x, o);
            x = MAX ? fmaxf(x, y) : x + y;
        }
        if (lane == 0) shared[0] = x;
    }
    __syncthreads();
    return shared[0];
}

template <typename T>
__device__ void ce_fwd(const T* __restrict__ x, const uint32_t* __restrict__ t, float* __restrict__ nll,
                       float* __restrict__ lse, uint32_t n, uint32_t v) {
    __shared__ float shared[32];
    for (uint32_t row = blockIdx.x; row < n; row += gridDim.x) {
        const T* xr = x + (size_t)row * v;
        float m = -INFINITY;
        for (uint32_t j = threadIdx.x; j < v; j += blockDim.x) m = fmaxf(m, to_f(xr[j]));
        m = block_reduce<true>(m, shared);
        float s = 0.f;
        for (uint32_t j = threadIdx.x; j < v; j += blockDim.x) s += expf(to_f(xr[j]) - m);
        s = block_reduce<false>(s, shared);
        if (threadIdx.x == 0) {
            const float l = m + logf(s);
            const uint32_t target = t[row];
            lse[row] = l;
            nll[row] = target < v ? l - to_f(xr[target]) : NAN;
        }
    }
}

template <typename T>
__device__ void ce_bwd(const T* __restrict__ x, const uint32_t* __restrict__ t, const float* __restrict__ lse,
                       const float* __restrict__ g, T* __restrict__ dx, uint32_t n, uint32_t v) {
    for (uint32_t row = blockIdx.x; row < n; row += gridDim.x) {
        const T* xr = x + (size_t)row * v;
        T* dr = dx + (size_t)row * v;
        const float l = lse[row], gi = g[row];
        const uint32_t target = t[row];
        for (uint32_t j = threadIdx.x; j < v; j += blockDim.x)
            dr[j] = from_f<T>(gi * (expf(to_f(xr[j]) - l) - (j == target ? 1.f : 0.f)));
    }
}

#define CE(T, NAME)                                                                                          \
    extern "C" __global__ void __launch_bounds__(CE_THREADS) zoo_ce_fwd_##NAME(                             \
        const T* x, const uint32_t* t, float* nll, float* lse, uint32_t n, uint32_t v) {                     \
        ce_fwd<T>(x, t, nll, lse, n, v);                                                                     \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(CE_THREADS) zoo_ce_bwd_##NAME(                             \
        const T* x, const uint32_t* t, const float* lse, const float* g, T* dx, uint32_t n, uint32_t v) {    \
        ce_bwd<T>(x, t, lse, g, dx, n, v);                                                                   \
    }
CE(float, f32)
CE(__nv_bfloat16, bf16)
CE(__half, f16)
