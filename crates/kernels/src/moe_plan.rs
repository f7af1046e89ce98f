//! The grouping of an MoE layer's token-choice assignments by expert, made where the assignments
//! are (on CUDA: one kernel, `src/cuda/moe_plan.cu`, so the host never waits for the router):
//! each expert's slots in slot order, its rows starting at a multiple of `tile` and padded to the
//! next one, so that every tile of rows belongs to one expert and the experts run as one batched
//! matmul over tiles. The number of tiles is the static bound `ceil(S / tile) + E` (S = N·k
//! slots), so no shape depends on the routing. [`plan_capacity`] gives every expert exactly one
//! tile of `cap` rows instead, dropping the slots past it (token dropping under a capacity factor).
//!
//! ```
//! use candle_core::{Device, Tensor};
//! // 3 tokens, k = 2: experts of the slots t·k + j.
//! let experts = Tensor::new(&[1u32, 0, 0, 1, 1, 2], &Device::Cpu)?;
//! let p = zoo_kernels::moe_plan::plan(&experts, 3, 2, 2)?;
//! assert_eq!(p.tiles, 3 + 3); // ceil(6 / 2) + 3
//! assert_eq!(p.counts.to_vec1::<u32>()?, vec![2, 3, 1]);
//! // Expert 0: slots 1, 2 (rows 0, 1); expert 1: slots 0, 3, 4 (rows 2, 3, 4; row 5 pads);
//! // expert 2: slot 5 (row 6; row 7 pads). Tiles 4 and 5 are past the last expert.
//! assert_eq!(p.inv.to_vec1::<u32>()?, vec![2, 0, 1, 3, 4, 6]);
//! assert_eq!(p.tile_expert.to_vec1::<u32>()?, vec![0, 1, 1, 2, 0, 0]);
//! assert_eq!(&p.rows.to_vec1::<u32>()?[..8], &[0, 1, 0, 1, 2, 3, 2, 3]); // token of a row (3: padding)
//! # Ok::<(), candle_core::Error>(())
//! ```

use candle_core::{DType, Device, Result, Tensor};

/// The plan of one routing (all u32, on the assignments' device).
pub struct MoePlan {
    /// (R,) the token of each row, N for a padding row (R = tiles · tile).
    pub rows: Tensor,
    /// (R,) the slot of each row, S for a padding row.
    pub slots: Tensor,
    /// (S,) the row of each slot (R for a slot dropped by [`plan_capacity`]).
    pub inv: Tensor,
    /// (tiles,) the expert of each tile (0 for the tiles past the last expert's rows: all padding).
    pub tile_expert: Tensor,
    /// (E,) slots per expert.
    pub counts: Tensor,
    pub tiles: usize,
    pub tile: usize,
}

/// The plan of `experts` (S,) u32, slot a = t·k + j, each below `n_experts`.
pub fn plan(experts: &Tensor, n_experts: usize, k: usize, tile: usize) -> Result<MoePlan> {
    make(experts, n_experts, k, tile, false)
}

/// The plan under a capacity of `cap` rows per expert (GShard's and Switch's token dropping):
/// expert e's rows are `e·cap .. (e + 1)·cap`, its first `cap` slots in slot order, padding after
/// them; the slots past the capacity are dropped (`inv` = R = E·cap), as the host's
/// `Routing::apply_capacity` keeps them. One tile per expert (`tiles` = E, `tile` = cap): every
/// shape is fixed by the config, so the experts run as one batched matmul over (E, cap, d) with
/// no weight copies.
///
/// ```
/// use candle_core::{Device, Tensor};
/// // 3 tokens, k = 2; expert 1 gets slots 0, 3, 4 but holds 2: slot 4 is dropped.
/// let experts = Tensor::new(&[1u32, 0, 0, 1, 1, 2], &Device::Cpu)?;
/// let p = zoo_kernels::moe_plan::plan_capacity(&experts, 3, 2, 2)?;
/// assert_eq!((p.tiles, p.tile), (3, 2));
/// assert_eq!(p.inv.to_vec1::<u32>()?, vec![2, 0, 1, 3, 6, 4]); // 6 = E·cap: dropped
/// assert_eq!(p.rows.to_vec1::<u32>()?, vec![0, 1, 0, 1, 2, 3]); // token of a row (3: padding)
/// assert_eq!(p.counts.to_vec1::<u32>()?, vec![2, 3, 1]); // slots routed, dropped ones included
/// # Ok::<(), candle_core::Error>(())
/// ```
pub fn plan_capacity(experts: &Tensor, n_experts: usize, k: usize, cap: usize) -> Result<MoePlan> {
    make(experts, n_experts, k, cap, true)
}

fn make(experts: &Tensor, n_experts: usize, k: usize, tile: usize, capped: bool) -> Result<MoePlan> {
    let s = experts.dim(0)?;
    if experts.dtype() != DType::U32 || experts.rank() != 1 || k == 0 || !s.is_multiple_of(k) || tile == 0 || n_experts == 0 {
        candle_core::bail!("moe plan: experts {:?} {:?}, k = {k}, tile = {tile}, {n_experts} experts", experts.dims(), experts.dtype());
    }
    let tiles = if capped { n_experts } else { s.div_ceil(tile) + n_experts };
    match experts.device() {
        Device::Cpu => cpu(&experts.to_vec1::<u32>()?, n_experts, k, tile, tiles, capped),
        #[cfg(feature = "cuda")]
        Device::Cuda(dev) => cuda::plan(dev, experts, n_experts, k, tile, tiles, capped),
        d => candle_core::bail!("moe plan: no form for {d:?}"),
    }
}

/// The CPU form (the reference of the kernel).
fn cpu(experts: &[u32], e: usize, k: usize, tile: usize, tiles: usize, capped: bool) -> Result<MoePlan> {
    let (s, r) = (experts.len(), tiles * tile);
    let n = s / k;
    let mut counts = vec![0u32; e];
    for &x in experts {
        match counts.get_mut(x as usize) {
            Some(c) => *c += 1,
            None => candle_core::bail!("moe plan: expert {x} of {e}"),
        }
    }
    let mut off = vec![0usize; e + 1];
    for i in 0..e {
        off[i + 1] = off[i] + if capped { tile } else { (counts[i] as usize).div_ceil(tile) * tile };
    }
    let tile_expert: Vec<u32> =
        (0..tiles).map(|t| (0..e).find(|&i| off[i] <= t * tile && t * tile < off[i + 1]).unwrap_or(0) as u32).collect();
    let (mut rows, mut slots, mut inv) = (vec![n as u32; r], vec![s as u32; r], vec![0u32; s]);
    let mut next = off[..e].to_vec();
    for (a, &x) in experts.iter().enumerate() {
        let row = next[x as usize];
        next[x as usize] += 1;
        if capped && row >= off[x as usize + 1] {
            inv[a] = r as u32; // dropped: past its expert's capacity
            continue;
        }
        rows[row] = (a / k) as u32;
        slots[row] = a as u32;
        inv[a] = row as u32;
    }
    let dev = Device::Cpu;
    Ok(MoePlan {
        rows: Tensor::new(rows, &dev)?,
        slots: Tensor::new(slots, &dev)?,
        inv: Tensor::new(inv, &dev)?,
        tile_expert: Tensor::new(tile_expert, &dev)?,
        counts: Tensor::new(counts, &dev)?,
        tiles,
        tile,
    })
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::MoePlan;
    use candle_core::cuda_backend::cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDevice, WrapErr};
    use candle_core::{CudaStorage, Result, Shape, Tensor};

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/moe_plan.ptx"));

    pub fn plan(dev: &CudaDevice, experts: &Tensor, e: usize, k: usize, tile: usize, tiles: usize, capped: bool) -> Result<MoePlan> {
        let s = experts.dim(0)?;
        let r = tiles * tile;
        let u32s = |n: usize| -> Result<_> {
            // SAFETY: the kernel writes every element of every output.
            Ok(unsafe { dev.alloc::<u32>(n.max(1))? })
        };
        let (rows, slots, inv, te, counts) = (u32s(r)?, u32s(r)?, u32s(s)?, u32s(tiles)?, u32s(e)?);
        let experts = experts.contiguous()?;
        let xp = crate::cuda_addr::tensor_addr(&experts)?;
        let stream = dev.cuda_stream();
        let f = dev.get_or_load_custom_func("zoo_moe_plan", "zoo_moe_plan", PTX)?;
        let (p_rows, _a) = rows.device_ptr(&stream);
        let (p_slots, _b) = slots.device_ptr(&stream);
        let (p_inv, _c) = inv.device_ptr(&stream);
        let (p_te, _d) = te.device_ptr(&stream);
        let (p_counts, _e) = counts.device_ptr(&stream);
        let (s32, e32, k32, tile32, t32) = (s as u32, e as u32, k as u32, tile as u32, tiles as u32);
        let cap32 = if capped { tile as u32 } else { 0u32 };
        let threads = 1024u32;
        let shared = ((3 * e + 1) + (threads as usize / 32) * e) * 4;
        let mut b = f.builder();
        b.arg(&xp).arg(&s32).arg(&e32).arg(&k32).arg(&tile32).arg(&t32).arg(&cap32);
        b.arg(&p_rows).arg(&p_slots).arg(&p_inv).arg(&p_te).arg(&p_counts);
        let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: shared as u32 };
        // SAFETY: experts holds S u32 below E (the router's top-k); the outputs hold R, R, S, T and
        // E u32; one block, shared memory as sized above.
        unsafe { b.launch(cfg) }.w()?;
        drop((_a, _b, _c, _d, _e));
        let t = |buf, n: usize| {
            let st = candle_core::Storage::Cuda(CudaStorage::wrap_cuda_slice(buf, dev.clone()));
            Tensor::from_storage(st, Shape::from(n), candle_core::op::BackpropOp::none(), false)
        };
        Ok(MoePlan { rows: t(rows, r), slots: t(slots, r), inv: t(inv, s), tile_expert: t(te, tiles), counts: t(counts, e), tiles, tile })
    }
}
