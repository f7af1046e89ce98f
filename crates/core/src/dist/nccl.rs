//! [`Comm`] over NCCL, loaded at run time from `libnccl.so.2` (the NCCL that PyTorch's wheels and
//! the CUDA toolkit install; `ZOO_NCCL_LIB` names another file): a zoo binary runs on machines
//! without NCCL, and only a multi-rank run asks for it, with an error naming what is missing.
//! Ranks meet through a file: rank 0 writes NCCL's unique id to it (atomically, by a rename), the
//! others wait for it; on one machine `zoo launch` picks the path, across machines it must be on a
//! shared filesystem (Slurm: `scripts/slurm-train.sbatch`).

use super::{Comm, World};
use candle_core::{DType, Device, Result, Tensor};
use std::ffi::{c_char, c_int, c_void};
use std::path::Path;
use std::time::{Duration, Instant};

#[repr(C)]
#[derive(Clone, Copy)]
struct UniqueId {
    internal: [u8; 128],
}

type NcclComm = *mut c_void;
type GetUniqueId = unsafe extern "C" fn(*mut UniqueId) -> c_int;
type CommInitRank = unsafe extern "C" fn(*mut NcclComm, c_int, UniqueId, c_int) -> c_int;
type AllReduce = unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, NcclComm, *mut c_void) -> c_int;
type CommDestroy = unsafe extern "C" fn(NcclComm) -> c_int;
type GetErrorString = unsafe extern "C" fn(c_int) -> *const c_char;

/// ncclDataType_t and ncclRedOp_t values (nccl.h).
const NCCL_FLOAT32: c_int = 7;
const NCCL_SUM: c_int = 0;

struct Lib {
    _lib: libloading::Library,
    get_unique_id: GetUniqueId,
    comm_init_rank: CommInitRank,
    all_reduce: AllReduce,
    comm_destroy: CommDestroy,
    error_string: GetErrorString,
}

impl Lib {
    fn load() -> Result<Lib> {
        let name = std::env::var("ZOO_NCCL_LIB").unwrap_or_else(|_| "libnccl.so.2".into());
        // SAFETY: loading NCCL runs its initialisers, which have no preconditions.
        let lib = unsafe { libloading::Library::new(&name) }.map_err(|e| {
            candle_core::Error::Msg(format!(
                "multi-GPU training needs NCCL: cannot load {name} ({e}); install NCCL (e.g. the nvidia-nccl-cu13 wheel) \
                 and put its lib folder on LD_LIBRARY_PATH, or set ZOO_NCCL_LIB to the file"
            ))
        })?;
        // SAFETY: the symbols have these C signatures in every NCCL 2.x.
        unsafe {
            let sym = |n: &[u8]| -> Result<*const c_void> {
                lib.get::<*const c_void>(n)
                    .map(|s| *s)
                    .map_err(|e| candle_core::Error::Msg(format!("{name} lacks {}: {e}", String::from_utf8_lossy(&n[..n.len() - 1]))))
            };
            Ok(Lib {
                get_unique_id: std::mem::transmute::<*const c_void, GetUniqueId>(sym(b"ncclGetUniqueId\0")?),
                comm_init_rank: std::mem::transmute::<*const c_void, CommInitRank>(sym(b"ncclCommInitRank\0")?),
                all_reduce: std::mem::transmute::<*const c_void, AllReduce>(sym(b"ncclAllReduce\0")?),
                comm_destroy: std::mem::transmute::<*const c_void, CommDestroy>(sym(b"ncclCommDestroy\0")?),
                error_string: std::mem::transmute::<*const c_void, GetErrorString>(sym(b"ncclGetErrorString\0")?),
                _lib: lib,
            })
        }
    }

    fn check(&self, what: &str, rc: c_int) -> Result<()> {
        if rc == 0 {
            return Ok(());
        }
        // SAFETY: NCCL returns a static string for every result code.
        let msg = unsafe { std::ffi::CStr::from_ptr((self.error_string)(rc)) }.to_string_lossy().into_owned();
        candle_core::bail!("NCCL {what} failed ({rc}: {msg})")
    }
}

/// One rank's NCCL communicator on one CUDA device.
pub struct Nccl {
    lib: Lib,
    comm: NcclComm,
    world: World,
    device: Device,
}

// SAFETY: the communicator is used from one thread at a time (the training loop); NCCL
// communicators may be moved between threads.
unsafe impl Send for Nccl {}
unsafe impl Sync for Nccl {}

impl std::fmt::Debug for Nccl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Nccl(rank {} of {})", self.world.rank, self.world.size)
    }
}

impl Nccl {
    /// Join the group: rank 0 makes the unique id and writes it to `id_file`; the others wait up
    /// to `timeout` for it. `device` is this rank's CUDA device.
    pub fn new(world: World, device: &Device, id_file: &Path, timeout: Duration) -> Result<Nccl> {
        if !device.is_cuda() {
            candle_core::bail!("multi-GPU training runs on CUDA devices (got {device:?})");
        }
        let lib = Lib::load()?;
        let mut id = UniqueId { internal: [0; 128] };
        if world.rank == 0 {
            // SAFETY: id is a valid out-pointer.
            lib.check("ncclGetUniqueId", unsafe { (lib.get_unique_id)(&mut id) })?;
            let tmp = id_file.with_extension("tmp");
            std::fs::write(&tmp, id.internal).and_then(|_| std::fs::rename(&tmp, id_file)).map_err(|e| {
                candle_core::Error::Msg(format!("writing the NCCL id to {}: {e}", id_file.display()))
            })?;
        } else {
            let t0 = Instant::now();
            loop {
                match std::fs::read(id_file) {
                    Ok(b) if b.len() == 128 => {
                        id.internal.copy_from_slice(&b);
                        break;
                    }
                    _ if t0.elapsed() > timeout => candle_core::bail!(
                        "rank {}: no NCCL id from rank 0 in {} after {:?} (did rank 0 start? is the file on a filesystem every rank sees?)",
                        world.rank,
                        id_file.display(),
                        timeout
                    ),
                    _ => std::thread::sleep(Duration::from_millis(50)),
                }
            }
        }
        let mut comm: NcclComm = std::ptr::null_mut();
        // SAFETY: comm is a valid out-pointer; every rank passes the same id and world size. The
        // CUDA context of `device` is current (candle made it on this thread).
        lib.check("ncclCommInitRank", unsafe { (lib.comm_init_rank)(&mut comm, world.size as c_int, id, world.rank as c_int) })?;
        Ok(Nccl { lib, comm, world, device: device.clone() })
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        // SAFETY: comm came from ncclCommInitRank and is destroyed once.
        unsafe { (self.lib.comm_destroy)(self.comm) };
    }
}

impl Comm for Nccl {
    fn rank(&self) -> usize {
        self.world.rank
    }
    fn world(&self) -> usize {
        self.world.size
    }
    fn backend(&self) -> &'static str {
        "nccl"
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        let x = t.to_device(&self.device)?.to_dtype(DType::F32)?.contiguous()?;
        let out = x.zeros_like()?;
        let Device::Cuda(dev) = &self.device else { unreachable!("checked in new") };
        let (src, dst) = (zoo_kernels::cuda_addr::tensor_addr(&x)?, zoo_kernels::cuda_addr::tensor_addr(&out)?);
        let stream = dev.cuda_stream().cu_stream() as *mut c_void;
        // SAFETY: src and dst hold elem_count f32 on this rank's device, alive until the call's
        // work is done (NCCL enqueues on candle's stream, which orders every later use).
        self.lib.check("ncclAllReduce", unsafe {
            (self.lib.all_reduce)(src as *const c_void, dst as *mut c_void, x.elem_count(), NCCL_FLOAT32, NCCL_SUM, self.comm, stream)
        })?;
        out.to_device(t.device())
    }
}
