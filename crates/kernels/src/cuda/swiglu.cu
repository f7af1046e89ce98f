// SwiGLU's gate z = silu(g) ⊙ u, elementwise (see swiglu.rs): the forward, and the backward in
// one pass writing both gradients, dg = dz · u · σ(g)(1 + g(1 − σ(g))) and du = dz · silu(g).
// f32 arithmetic on f32, bf16 or f16 elements.
#include "convert.cuh"

template <typename T>
__device__ void swiglu_fwd(const T* __restrict__ g, const T* __restrict__ u, T* __restrict__ z, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const float a = to_f(g[i]);
        z[i] = from_f<T>(a / (1.0f + __expf(-a)) * to_f(u[i]));
    }
}

template <typename T>
__device__ void swiglu_bwd(const T* __restrict__ g, const T* __restrict__ u, const T* __restrict__ dz, T* __restrict__ dg,
                           T* __restrict__ du, long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const float a = to_f(g[i]), d = to_f(dz[i]);
        const float sg = 1.0f / (1.0f + __expf(-a));
        dg[i] = from_f<T>(d * to_f(u[i]) * sg * (1.0f + a * (1.0f - sg)));
        du[i] = from_f<T>(d * a * sg);
    }
}

#define SWIGLU(T, NAME)                                                                                      \
    extern "C" __global__ void zoo_swiglu_fwd_##NAME(const T* g, const T* u, T* z, long long n) {            \
        swiglu_fwd<T>(g, u, z, n);                                                                           \
    }                                                                                                        \
    extern "C" __global__ void zoo_swiglu_bwd_##NAME(const T* g, const T* u, const T* dz, T* dg, T* du,       \
                                                    long long n) {                                         \
        swiglu_bwd<T>(g, u, dz, dg, du, n);                                                                  \
    }
SWIGLU(float, f32)
SWIGLU(__nv_bfloat16, bf16)
SWIGLU(__half, f16)
