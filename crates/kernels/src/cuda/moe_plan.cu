// The grouping of an MoE layer's token-choice assignments by expert, on the device (no host
// round-trip): experts (S = N*k slots, slot a = token a / k), E experts, tiles of TILE rows. Each
// expert's rows start at a multiple of TILE (its slots in slot order, then padding up to the
// next multiple), so that a tile of rows belongs to one expert and the experts can run as one
// batched matmul over tiles. Outputs (u32):
//   rows[R]        token of each row (N for a padding row), R = T * TILE
//   slots[R]       slot of each row (S for a padding row)
//   inv[S]         row of each slot
//   tile_expert[T] expert of each tile (0 for a tile past the last expert's: its rows are padding)
//   counts[E]      slots per expert
// With cap > 0 (a capacity: GShard's / Switch's token dropping) every expert gets exactly cap rows
// (tile = cap, T = E): its first cap slots in slot order, the rest dropped (inv = R), as the host's
// `Routing::apply_capacity` keeps them.
// One block of 1024 threads: counts by shared-memory atomics (order-free), the padded offsets by
// one thread, then each chunk of 1024 slots ranked within its expert in slot order (a warp's
// equal experts by __match_any_sync, the warps before it from a shared table), so the plan is
// deterministic and equals the CPU form in moe.rs.
#include <stdint.h>

extern "C" __global__ void __launch_bounds__(1024) zoo_moe_plan(const uint32_t* __restrict__ experts, uint32_t S, uint32_t E,
                                                                uint32_t k, uint32_t tile, uint32_t T, uint32_t cap,
                                                                uint32_t* __restrict__ rows, uint32_t* __restrict__ slots,
                                                                uint32_t* __restrict__ inv, uint32_t* __restrict__ tile_expert,
                                                                uint32_t* __restrict__ counts) {
    extern __shared__ uint32_t sh[];
    uint32_t* cnt = sh;            // E
    uint32_t* off = cnt + E;       // E + 1
    uint32_t* run = off + E + 1;   // E
    uint32_t* wc = run + E;        // 32 x E
    const uint32_t tid = threadIdx.x, nth = blockDim.x, lane = tid & 31, warp = tid >> 5, nwarps = nth >> 5;
    const uint32_t N = S / k, R = T * tile;
    for (uint32_t e = tid; e < E; e += nth) { cnt[e] = 0; run[e] = 0; }
    for (uint32_t r = tid; r < R; r += nth) { rows[r] = N; slots[r] = S; }
    __syncthreads();
    for (uint32_t a = tid; a < S; a += nth) atomicAdd(&cnt[experts[a]], 1u);
    __syncthreads();
    if (tid == 0) {
        off[0] = 0;
        for (uint32_t e = 0; e < E; e++) off[e + 1] = off[e] + (cap ? cap : (cnt[e] + tile - 1) / tile * tile);
    }
    __syncthreads();
    for (uint32_t e = tid; e < E; e += nth) counts[e] = cnt[e];
    for (uint32_t t = tid; t < T; t += nth) {
        const uint32_t r0 = t * tile;
        uint32_t x = 0;
        for (uint32_t e = 0; e < E; e++)
            if (off[e] <= r0 && r0 < off[e + 1]) x = e;
        tile_expert[t] = x;
    }
    for (uint32_t base = 0; base < S; base += nth) {
        for (uint32_t i = tid; i < nwarps * E; i += nth) wc[i] = 0;
        __syncthreads();
        const uint32_t a = base + tid;
        const bool valid = a < S;
        const uint32_t e = valid ? experts[a] : 0xffffffffu;
        const uint32_t same = __match_any_sync(0xffffffffu, e);
        const uint32_t lrank = __popc(same & ((1u << lane) - 1u));
        if (valid && lrank == 0) wc[warp * E + e] = __popc(same);
        __syncthreads();
        if (valid) {
            uint32_t before = 0;
            for (uint32_t w = 0; w < warp; w++) before += wc[w * E + e];
            const uint32_t rank = run[e] + before + lrank;
            if (cap && rank >= cap) {
                inv[a] = R;  // dropped: past its expert's capacity
            } else {
                const uint32_t row = off[e] + rank;
                rows[row] = a / k;
                slots[row] = a;
                inv[a] = row;
            }
        }
        __syncthreads();
        for (uint32_t x = tid; x < E; x += nth) {
            uint32_t c = 0;
            for (uint32_t w = 0; w < nwarps; w++) c += wc[w * E + x];
            run[x] += c;
        }
        __syncthreads();
    }
}
