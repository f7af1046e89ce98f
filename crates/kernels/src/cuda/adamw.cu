// Multi-tensor AdamW with global grad-norm clipping (Loshchilov & Hutter, "Decoupled Weight Decay
// Regularization", Algorithm 2; clipping as torch.nn.utils.clip_grad_norm_), in two launches per
// list of up to MAXT tensors plus one for the norm:
//   zoo_sumsq_f32     per-block partial sums of g^2, grid (blocks, tensors): partials[t*gx + b]
//   zoo_clip_scale    one block sums every partial in a fixed order (deterministic):
//                     out = [||g||_2, min(max_norm / (||g|| + 1e-6), 1)]
//   zoo_adamw_f32     g' = s*g; m = b1 m + (1-b1) g'; v = b2 v + (1-b2) g'^2;
//                     w = w (1 - lr wd [decay]) - lr (m / bc1) / (sqrt(v / bc2) + eps),
//                     nothing at all when ||g|| is not finite
// f32 master weights, moments and gradients; the update is computed in f32 like the composition
// in zoo-core's optim.rs (the reference it is tested against).
#include <stdint.h>
#include "warp.cuh"

#define MAXT 48

struct TensorList {
    uint64_t w[MAXT];
    uint64_t g[MAXT];
    uint64_t m[MAXT];
    uint64_t v[MAXT];
    uint32_t n[MAXT];
    uint32_t decay[MAXT];
    // Index of this list's first tensor among all tensors of the step (partials row).
    uint32_t first;
    uint32_t count;
};

extern "C" __global__ void zoo_sumsq_f32(const TensorList tl, float* __restrict__ partials) {
    const uint32_t t = blockIdx.y;
    const float* g = reinterpret_cast<const float*>(tl.g[t]);
    const uint32_t n = tl.n[t];
    float acc = 0.f;
    for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        const float x = g[i];
        acc = fmaf(x, x, acc);
    }
    __shared__ float sh[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    acc = warp_sum(acc);
    if (lane == 0) sh[warp] = acc;
    __syncthreads();
    if (warp == 0) {
        acc = lane < (int)(blockDim.x >> 5) ? sh[lane] : 0.f;
        acc = warp_sum(acc);
        if (lane == 0) partials[(size_t)(tl.first + t) * gridDim.x + blockIdx.x] = acc;
    }
}

// One block of 1024 threads. Thread i sums partials i, i + 1024, ... in order, then a fixed tree.
extern "C" __global__ void zoo_clip_scale(const float* __restrict__ partials, uint32_t np, float max_norm,
                                          float* __restrict__ out) {
    __shared__ double sh[1024];
    double acc = 0.0;
    for (uint32_t i = threadIdx.x; i < np; i += blockDim.x) acc += (double)partials[i];
    sh[threadIdx.x] = acc;
    __syncthreads();
    for (uint32_t s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        const float norm = (float)sqrt(sh[0]);
        out[0] = norm;
        out[1] = max_norm > 0.f ? fminf(max_norm / (norm + 1e-6f), 1.f) : 1.f;
    }
}

__device__ __forceinline__ void adamw(const TensorList& tl, const float* __restrict__ scale, uint32_t use_scale,
                                      float lr, float beta1, float beta2, float eps, float weight_decay, float bc1,
                                      float bc2) {
    const uint32_t t = blockIdx.y;
    float* w = reinterpret_cast<float*>(tl.w[t]);
    const float* g = reinterpret_cast<const float*>(tl.g[t]);
    float* m = reinterpret_cast<float*>(tl.m[t]);
    float* v = reinterpret_cast<float*>(tl.v[t]);
    const uint32_t n = tl.n[t];
    // A non-finite gradient norm leaves every weight and moment as it was; the caller reads the
    // norm and stops the run (the composition checks before it updates).
    if (!isfinite(scale[0])) return;
    const float s = use_scale ? scale[1] : 1.f;
    const float keep = tl.decay[t] ? 1.f - lr * weight_decay : 1.f;
    for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        const float gi = g[i] * s;
        const float mi = beta1 * m[i] + (1.f - beta1) * gi;
        const float vi = beta2 * v[i] + (1.f - beta2) * (gi * gi);
        m[i] = mi;
        v[i] = vi;
        const float upd = (mi / bc1) / (sqrtf(vi / bc2) + eps);
        w[i] = w[i] * keep - upd * lr;
    }
}

extern "C" __global__ void zoo_adamw_f32(const TensorList tl, const float* __restrict__ scale, uint32_t use_scale,
                                         float lr, float beta1, float beta2, float eps, float weight_decay,
                                         float bc1, float bc2) {
    adamw(tl, scale, use_scale, lr, beta1, beta2, eps, weight_decay, bc1, bc2);
}

// The same step with lr, bc1 and bc2 read from device memory (hp = [lr, bc1, bc2]), so that a step
// captured into a CUDA graph takes each replay's values (written to hp before the replay).
extern "C" __global__ void zoo_adamw_hp_f32(const TensorList tl, const float* __restrict__ scale, uint32_t use_scale,
                                            const float* __restrict__ hp, float beta1, float beta2, float eps,
                                            float weight_decay) {
    adamw(tl, scale, use_scale, hp[0], beta1, beta2, eps, weight_decay, hp[1], hp[2]);
}
