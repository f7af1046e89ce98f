// Token embedding lookup and its gradient: out[i, :] = W[ids[i], :] and dW[v, :] = Σ_{i: ids[i] = v} g[i, :].
// candle's backward of index_select is index_add, whose CUDA kernel walks all N ids in each of d
// threads (36 ms for N = 65,536, d = 128 on an H200); here one block per row scatters it with
// atomicAdd (the order of the additions into one row, and so the last bits, can vary run to run).
#include <stdint.h>

extern "C" __global__ void zoo_embedding_fwd_f32(const uint32_t* __restrict__ ids, const float* __restrict__ w,
                                                 float* __restrict__ out, uint32_t n, uint32_t d, uint32_t vocab) {
    for (uint32_t row = blockIdx.x; row < n; row += gridDim.x) {
        const uint32_t id = ids[row];
        for (uint32_t j = threadIdx.x; j < d; j += blockDim.x)
            out[(size_t)row * d + j] = id < vocab ? w[(size_t)id * d + j] : 0.f;
    }
}

extern "C" __global__ void zoo_embedding_bwd_f32(const uint32_t* __restrict__ ids, const float* __restrict__ g,
                                                 float* __restrict__ dw, uint32_t n, uint32_t d, uint32_t vocab) {
    for (uint32_t row = blockIdx.x; row < n; row += gridDim.x) {
        const uint32_t id = ids[row];
        if (id >= vocab) continue;
        for (uint32_t j = threadIdx.x; j < d; j += blockDim.x)
            atomicAdd(&dw[(size_t)id * d + j], g[(size_t)row * d + j]);
    }
}

// ---------------------------------------------------------------------------------------------
// The deterministic gradient (the default): dW's rows summed in a fixed order, so a run's last bits
// do not depend on how the GPU scheduled it. The positions are sorted by id (a stable LSD radix
// sort over 8-bit digits: tile histograms, one scan, a stable scatter), then each id's positions,
// in ascending order, are summed in pieces of EMB_PIECE rows and the pieces in order:
//   counts c_v, offsets o_v = Σ_{u<v} c_u, pieces p_v = ceil(c_v / EMB_PIECE) with offsets q_v,
//   partial[q_v + k] = Σ_{j in piece k of v} g[pos_j],  dW[v] = Σ_k partial[q_v + k].
// Ids at or past the vocabulary are sorted into an extra bucket V and summed nowhere. Every launch
// has a grid fixed by (N, V, d), and nothing is read back to the host, so CUDA graphs capture it.
#define EMB_PIECE 32
#define EMB_TILE 1024
#define EMB_SCAN 1024

// counts[min(id, V)] += 1 (integer atomics: the counts are exact whatever the order).
extern "C" __global__ void zoo_emb_count(const uint32_t* __restrict__ ids, uint32_t* __restrict__ counts, uint32_t n,
                                         uint32_t vocab) {
    for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        atomicAdd(&counts[min(ids[i], vocab)], 1u);
}

// out[0..m] = exclusive scan of f(in[0..m)), out[m] = the total, with f(x) = x (piece = 0) or
// ceil(x / piece). One block of EMB_SCAN threads, each over a contiguous run of the input.
extern "C" __global__ void zoo_emb_scan(const uint32_t* __restrict__ in, uint32_t* __restrict__ out, uint32_t m,
                                        uint32_t piece) {
    __shared__ uint32_t sums[EMB_SCAN];
    const uint32_t t = threadIdx.x;
    const uint32_t run = (m + EMB_SCAN - 1) / EMB_SCAN;
    const uint32_t lo = min(t * run, m), hi = min(lo + run, m);
    uint32_t s = 0;
    for (uint32_t i = lo; i < hi; i++) s += piece ? (in[i] + piece - 1) / piece : in[i];
    sums[t] = s;
    __syncthreads();
    // Hillis-Steele inclusive scan of the per-thread sums.
    for (uint32_t o = 1; o < EMB_SCAN; o <<= 1) {
        const uint32_t x = t >= o ? sums[t - o] : 0;
        __syncthreads();
        sums[t] += x;
        __syncthreads();
    }
    uint32_t acc = sums[t] - s;
    for (uint32_t i = lo; i < hi; i++) {
        out[i] = acc;
        acc += piece ? (in[i] + piece - 1) / piece : in[i];
    }
    if (t == EMB_SCAN - 1) out[m] = sums[t];
}

__device__ __forceinline__ uint32_t emb_key(const uint32_t* keys, uint32_t i, uint32_t vocab, bool first) {
    return first ? min(keys[i], vocab) : keys[i];
}

// One radix pass, step 1: hist[digit · tiles + tile] = how many keys of the tile have that digit.
extern "C" __global__ void zoo_emb_hist(const uint32_t* __restrict__ keys, uint32_t* __restrict__ hist, uint32_t n,
                                        uint32_t vocab, uint32_t shift, uint32_t first) {
    __shared__ uint32_t h[256];
    for (uint32_t i = threadIdx.x; i < 256; i += blockDim.x) h[i] = 0;
    __syncthreads();
    const uint32_t lo = blockIdx.x * EMB_TILE, hi = min(lo + EMB_TILE, n);
    for (uint32_t i = lo + threadIdx.x; i < hi; i += blockDim.x)
        atomicAdd(&h[(emb_key(keys, i, vocab, first) >> shift) & 255], 1u);
    __syncthreads();
    for (uint32_t i = threadIdx.x; i < 256; i += blockDim.x) hist[i * gridDim.x + blockIdx.x] = h[i];
}

// One radix pass, step 3 (after the scan of hist into base): one warp walks its tile in order, 32
// keys at a time, and writes each key where its digit's next free slot is: a key's place among
// equal digits follows its position, so the sort is stable. vals = null on the first pass: the
// values are the positions themselves.
extern "C" __global__ void zoo_emb_scatter(const uint32_t* __restrict__ keys, const uint32_t* __restrict__ vals,
                                           const uint32_t* __restrict__ base, uint32_t* __restrict__ keys_out,
                                           uint32_t* __restrict__ vals_out, uint32_t n, uint32_t vocab, uint32_t shift,
                                           uint32_t first) {
    __shared__ uint32_t next[256];
    const uint32_t lane = threadIdx.x;
    for (uint32_t i = lane; i < 256; i += 32) next[i] = base[i * gridDim.x + blockIdx.x];
    __syncwarp();
    const uint32_t lo = blockIdx.x * EMB_TILE, hi = min(lo + EMB_TILE, n);
    for (uint32_t r = lo; r < hi; r += 32) {
        const uint32_t i = r + lane;
        const bool live = i < hi;
        const uint32_t key = live ? emb_key(keys, i, vocab, first) : 0;
        // Lanes past the tile's end get digits no live lane has (256 + lane).
        const uint32_t digit = live ? (key >> shift) & 255 : 256 + lane;
        const uint32_t peers = __match_any_sync(0xffffffffu, digit);
        const uint32_t before = __popc(peers & ((1u << lane) - 1));
        const uint32_t at = live ? next[digit] + before : 0;
        __syncwarp();
        if (live && before == 0) next[digit] += __popc(peers);
        __syncwarp();
        if (live) {
            keys_out[at] = key;
            vals_out[at] = vals ? vals[i] : i;
        }
    }
}

// For each row v < V: the start (in the sorted order) and row of each of its pieces.
extern "C" __global__ void zoo_emb_pieces(const uint32_t* __restrict__ offsets, const uint32_t* __restrict__ poffsets,
                                          uint2* __restrict__ pieces, uint32_t vocab) {
    for (uint32_t v = blockIdx.x * blockDim.x + threadIdx.x; v < vocab; v += gridDim.x * blockDim.x) {
        const uint32_t start = offsets[v];
        for (uint32_t k = poffsets[v]; k < poffsets[v + 1]; k++) pieces[k] = make_uint2(start + (k - poffsets[v]) * EMB_PIECE, v);
    }
}

// partial[k] = the sum, in ascending position, of piece k's gradient rows; a block per piece
// (blocks past the number of pieces, poffsets[V], return).
extern "C" __global__ void zoo_emb_piece_sum(const uint2* __restrict__ pieces, const uint32_t* __restrict__ offsets,
                                             const uint32_t* __restrict__ poffsets, const uint32_t* __restrict__ pos,
                                             const float* __restrict__ g, float* __restrict__ partial, uint32_t vocab,
                                             uint32_t d) {
    const uint32_t total = poffsets[vocab];
    for (uint32_t k = blockIdx.x; k < total; k += gridDim.x) {
        const uint2 p = pieces[k];
        const uint32_t end = min(p.x + EMB_PIECE, offsets[p.y + 1]);
        for (uint32_t j = threadIdx.x; j < d; j += blockDim.x) {
            float acc = 0.f;
            for (uint32_t s = p.x; s < end; s++) acc += g[(size_t)pos[s] * d + j];
            partial[(size_t)k * d + j] = acc;
        }
    }
}

// dW[v] = the sum of v's pieces in order (zero for an id no position has).
extern "C" __global__ void zoo_emb_row_sum(const uint32_t* __restrict__ poffsets, const float* __restrict__ partial,
                                           float* __restrict__ dw, uint32_t vocab, uint32_t d) {
    for (uint32_t v = blockIdx.x; v < vocab; v += gridDim.x) {
        const uint32_t a = poffsets[v], b = poffsets[v + 1];
        for (uint32_t j = threadIdx.x; j < d; j += blockDim.x) {
            float acc = 0.f;
            for (uint32_t k = a; k < b; k++) acc += partial[(size_t)k * d + j];
            dw[(size_t)v * d + j] = acc;
        }
    }
}
