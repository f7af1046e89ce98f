// Rotary position embedding on (rows, 2h) rows of (B, H, T, 2h) tensors (see rope.rs): the
// halves rotate by the angle of the row's position, y = [x1 c − x2 s, x2 c + x1 s], one thread per
// pair; the backward is the same map with s negated (sign = −1). cos and sin are f32 (T, h).
#include "convert.cuh"

template <typename T>
__device__ void rope(const T* __restrict__ x, const float* __restrict__ cos, const float* __restrict__ sin,
                     T* __restrict__ y, long long pairs, int t, int h, float sign) {
    for (long long p = (long long)blockIdx.x * blockDim.x + threadIdx.x; p < pairs; p += (long long)gridDim.x * blockDim.x) {
        const long long row = p / h;
        const int i = (int)(p % h), pos = (int)(row % t);
        const float c = cos[(size_t)pos * h + i], s = sign * sin[(size_t)pos * h + i];
        const size_t at = (size_t)row * 2 * h + i;
        const float a = to_f(x[at]), b = to_f(x[at + h]);
        y[at] = from_f<T>(a * c - b * s);
        y[at + h] = from_f<T>(b * c + a * s);
    }
}

#define ROPE(T, NAME)                                                                                     \
    extern "C" __global__ void zoo_rope_##NAME(const T* x, const float* cos, const float* sin, T* y,       \
                                               long long pairs, int t, int h, float sign) {              \
        rope<T>(x, cos, sin, y, pairs, t, h, sign);                                                       \
    }
ROPE(float, f32)
ROPE(__nv_bfloat16, bf16)
ROPE(__half, f16)
