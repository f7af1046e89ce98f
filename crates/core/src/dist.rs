//! Data parallelism: one process (or, in tests, one thread) per rank, each holding the whole
//! model, gradients summed over ranks after every backward pass (PyTorch DDP's scheme; Li et al.
//! 2020, "PyTorch Distributed: Experiences on Accelerating Data Parallel Training").
//!
//! Every rank draws the same global batch from the same data stream (the training RNG is shared)
//! and keeps its own equal slice of the rows ([`rank_rows`]), so the global batch, the data order
//! and the checkpointed data position do not depend on the number of ranks: a run resumes with
//! any world size, and one rank is today's single-device path exactly. Each rank's loss is
//! weighted by its share of the counted tokens ([`token_weight`]), so the mean of the ranks'
//! gradients ([`all_reduce_mean`]) is the gradient of the global batch's mean loss, masks
//! included. Updates are then identical on every rank.
//!
//! Backends ([`Comm`]): [`ThreadComm`], ranks as threads of one process (CPU tests), and on CUDA
//! `NcclComm` (`dist::nccl`), NCCL loaded at run time (`libnccl.so.2`), ranks as processes that
//! meet through a file holding NCCL's unique id (`zoo launch` writes its path into
//! `ZOO_NCCL_ID_FILE`).

use candle_core::{DType, Result, Tensor};
use std::sync::{Arc, Condvar, Mutex};

/// A communicator among `world()` ranks.
pub trait Comm: Send + Sync + std::fmt::Debug {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// The element-wise sum over ranks of `t` (f32; the same shape on every rank). Every rank
    /// calls it with the same sequence of shapes.
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor>;
    /// Which backend, for result JSONs (`"threads"`, `"nccl"`).
    fn backend(&self) -> &'static str;
}

/// Rows `[start, start + len)` of a global batch of `batch` rows that `rank` of `world` trains on.
/// The batch must split evenly (the config check says so before any work).
pub fn rank_rows(batch: usize, rank: usize, world: usize) -> Result<(usize, usize)> {
    if world == 0 || batch % world != 0 {
        candle_core::bail!("a batch of {batch} rows does not split evenly over {world} ranks");
    }
    let len = batch / world;
    Ok((rank * len, len))
}

/// The factor on this rank's mean loss that makes the ranks' mean gradient the gradient of the
/// global mean: `n_rank · world / n_total`, with n the tokens the loss counts (the mask's ones).
pub fn token_weight(comm: &dyn Comm, counted: f64) -> Result<f64> {
    let dev = candle_core::Device::Cpu;
    let n = comm.all_reduce_sum(&Tensor::new(&[counted as f32], &dev)?)?.to_vec1::<f32>()?[0] as f64;
    Ok(if n > 0.0 { counted * comm.world() as f64 / n } else { 1.0 })
}

/// Replace each gradient by its mean over ranks: the gradients, flattened to f32 and
/// concatenated into buckets of about `BUCKET` elements, one all-reduce per bucket (few large
/// messages rather than one per tensor), then split back into their shapes and dtypes.
pub fn all_reduce_mean(comm: &dyn Comm, grads: &mut [Tensor]) -> Result<()> {
    const BUCKET: usize = 1 << 23; // 8M f32 = 32 MiB
    let world = comm.world();
    if world == 1 {
        return Ok(());
    }
    let mut start = 0;
    while start < grads.len() {
        let mut end = start;
        let mut n = 0;
        while end < grads.len() && (end == start || n + grads[end].elem_count() <= BUCKET) {
            n += grads[end].elem_count();
            end += 1;
        }
        let flat: Vec<Tensor> = grads[start..end].iter().map(|g| g.to_dtype(DType::F32)?.flatten_all()).collect::<Result<_>>()?;
        let sum = comm.all_reduce_sum(&Tensor::cat(&flat, 0)?)?;
        let mean = (sum * (1.0 / world as f64))?;
        let mut at = 0;
        for g in &mut grads[start..end] {
            let k = g.elem_count();
            *g = mean.narrow(0, at, k)?.reshape(g.shape())?.to_dtype(g.dtype())?;
            at += k;
        }
        start = end;
    }
    Ok(())
}

thread_local! {
    static CURRENT: std::cell::RefCell<Option<Arc<dyn Comm>>> = const { std::cell::RefCell::new(None) };
}

/// The communicator of the training loop running on this thread, for module hooks that must
/// agree across ranks (the MoE router's aux-loss-free bias update sums its expert loads over
/// ranks). `None` outside data-parallel training.
pub fn current() -> Option<Arc<dyn Comm>> {
    CURRENT.with(|c| c.borrow().clone())
}

/// Make `comm` [`current`] on this thread until the guard drops (the training loop does this).
pub fn enter(comm: Option<Arc<dyn Comm>>) -> CurrentGuard {
    let prev = CURRENT.with(|c| std::mem::replace(&mut *c.borrow_mut(), comm));
    CurrentGuard { prev }
}

pub struct CurrentGuard {
    prev: Option<Arc<dyn Comm>>,
}

impl Drop for CurrentGuard {
    fn drop(&mut self) {
        let prev = self.prev.take();
        CURRENT.with(|c| *c.borrow_mut() = prev);
    }
}

/// Ranks as threads of one process: a barrier that sums each round's contributions in rank order
/// (so every rank gets the same bits). For tests of the data-parallel path on CPU.
#[derive(Debug)]
pub struct ThreadComm {
    rank: usize,
    world: usize,
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    round: Mutex<Round>,
    done: Condvar,
}

#[derive(Debug, Default)]
struct Round {
    parts: Vec<Option<Vec<f32>>>,
    arrived: usize,
    generation: u64,
    result: Arc<Vec<f32>>,
}

impl ThreadComm {
    /// One communicator per rank of a `world`-rank group.
    pub fn group(world: usize) -> Vec<ThreadComm> {
        let shared = Arc::new(Shared::default());
        shared.round.lock().unwrap().parts = vec![None; world];
        (0..world).map(|rank| ThreadComm { rank, world, shared: shared.clone() }).collect()
    }
}

impl Comm for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn backend(&self) -> &'static str {
        "threads"
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        let data = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let mut r = self.shared.round.lock().unwrap();
        let gen = r.generation;
        r.parts[self.rank] = Some(data);
        r.arrived += 1;
        if r.arrived == self.world {
            let parts: Vec<Vec<f32>> = r.parts.iter_mut().map(|p| p.take().unwrap()).collect();
            if parts.iter().any(|p| p.len() != parts[0].len()) {
                candle_core::bail!("all-reduce: ranks sent different sizes {:?}", parts.iter().map(Vec::len).collect::<Vec<_>>());
            }
            let mut sum = parts[0].clone();
            for p in &parts[1..] {
                sum.iter_mut().zip(p).for_each(|(s, x)| *s += x);
            }
            r.result = Arc::new(sum);
            r.arrived = 0;
            r.generation += 1;
            self.shared.done.notify_all();
        } else {
            while r.generation == gen {
                r = self.shared.done.wait(r).unwrap();
            }
        }
        let out = r.result.clone();
        drop(r);
        Tensor::from_vec(out.to_vec(), t.shape(), t.device())
    }
}

/// The world this process belongs to, from torchrun's variables (`RANK`, `WORLD_SIZE`,
/// `LOCAL_RANK`; Slurm's `SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID` where those are unset).
/// `None` without them (or with a world of one): the single-device path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct World {
    pub rank: usize,
    pub size: usize,
    pub local_rank: usize,
}

impl World {
    pub fn from_env() -> std::result::Result<Option<World>, String> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// [`World::from_env`] over any variable lookup (testable).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> std::result::Result<Option<World>, String> {
        let read = |names: [&str; 2]| -> std::result::Result<Option<usize>, String> {
            for n in names {
                if let Some(v) = get(n) {
                    return v.trim().parse::<usize>().map(Some).map_err(|_| format!("{n}={v:?} is not a non-negative integer"));
                }
            }
            Ok(None)
        };
        let size = read(["WORLD_SIZE", "SLURM_NTASKS"])?;
        let rank = read(["RANK", "SLURM_PROCID"])?;
        let local = read(["LOCAL_RANK", "SLURM_LOCALID"])?;
        match (size, rank) {
            (None, None) | (Some(1), None | Some(0)) => Ok(None),
            (Some(size), Some(rank)) => {
                if size == 0 || rank >= size {
                    return Err(format!("RANK={rank} is not below WORLD_SIZE={size}"));
                }
                if size == 1 {
                    return Ok(None);
                }
                Ok(Some(World { rank, size, local_rank: local.unwrap_or(rank) }))
            }
            (Some(size), None) => Err(format!("WORLD_SIZE={size} is set but RANK is not")),
            (None, Some(rank)) => Err(format!("RANK={rank} is set but WORLD_SIZE is not")),
        }
    }
}

#[cfg(feature = "cuda")]
pub mod nccl;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_comm_sums_in_rank_order_over_many_rounds() {
        let comms = ThreadComm::group(3);
        let handles: Vec<_> = comms
            .into_iter()
            .map(|c| {
                std::thread::spawn(move || -> Vec<Vec<f32>> {
                    (0..50)
                        .map(|round| {
                            let x = Tensor::new(&[c.rank() as f32 + round as f32, 1.0], &candle_core::Device::Cpu).unwrap();
                            c.all_reduce_sum(&x).unwrap().to_vec1::<f32>().unwrap()
                        })
                        .collect()
                })
            })
            .collect();
        let outs: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        for round in 0..50 {
            let want = vec![3.0 + 3.0 * round as f32, 3.0];
            for o in &outs {
                assert_eq!(o[round], want, "round {round}");
            }
        }
    }

    #[test]
    fn rows_split_evenly_or_fail_naming_the_sizes() {
        assert_eq!(rank_rows(8, 3, 4).unwrap(), (6, 2));
        let e = rank_rows(6, 0, 4).unwrap_err().to_string();
        assert!(e.contains("6 rows") && e.contains("4 ranks"), "{e}");
    }

    #[test]
    fn the_world_comes_from_torchrun_or_slurm_variables() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |k: &str| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
        };
        assert_eq!(World::from_vars(env(&[])).unwrap(), None);
        assert_eq!(World::from_vars(env(&[("WORLD_SIZE", "1"), ("RANK", "0")])).unwrap(), None);
        assert_eq!(
            World::from_vars(env(&[("WORLD_SIZE", "4"), ("RANK", "2"), ("LOCAL_RANK", "0")])).unwrap(),
            Some(World { rank: 2, size: 4, local_rank: 0 })
        );
        assert_eq!(
            World::from_vars(env(&[("SLURM_NTASKS", "2"), ("SLURM_PROCID", "1"), ("SLURM_LOCALID", "1")])).unwrap(),
            Some(World { rank: 1, size: 2, local_rank: 1 })
        );
        assert!(World::from_vars(env(&[("WORLD_SIZE", "2")])).unwrap_err().contains("RANK is not"));
        assert!(World::from_vars(env(&[("WORLD_SIZE", "2"), ("RANK", "2")])).unwrap_err().contains("not below"));
        assert!(World::from_vars(env(&[("WORLD_SIZE", "two"), ("RANK", "0")])).unwrap_err().contains("WORLD_SIZE=\"two\""));
    }
}
