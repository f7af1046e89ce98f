//! Device addresses of candle's CUDA buffers, for kernels that take raw pointers.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::DevicePtr;
use candle_core::{CudaStorage, DType, Layout, Result, Storage, Tensor};

/// Address of the first element of a contiguous f32, bf16, f16 or u32 storage. The buffer must
/// outlive the kernels that use the address (the caller holds its tensor) and all work must be on
/// the device's one stream, which orders every read and write.
pub fn storage_addr(cs: &CudaStorage, l: &Layout) -> Result<u64> {
    if !l.is_contiguous() {
        candle_core::bail!("zoo-kernels: input not contiguous")
    }
    view_addr(cs, l)
}

/// Address of the first element of a view (`l.start_offset()`), whatever its strides: for kernels
/// that take the strides too. The same conditions as [`storage_addr`].
pub fn view_addr(cs: &CudaStorage, l: &Layout) -> Result<u64> {
    let stream = cs.device.cuda_stream();
    let (p, size) = match cs.dtype() {
        DType::F32 => (cs.as_cuda_slice::<f32>()?.device_ptr(&stream).0, 4),
        DType::BF16 => (cs.as_cuda_slice::<half::bf16>()?.device_ptr(&stream).0, 2),
        DType::F16 => (cs.as_cuda_slice::<half::f16>()?.device_ptr(&stream).0, 2),
        DType::U32 => (cs.as_cuda_slice::<u32>()?.device_ptr(&stream).0, 4),
        t => candle_core::bail!("zoo-kernels: no raw address for dtype {t:?}"),
    };
    Ok(p + (l.start_offset() * size) as u64)
}

/// [`storage_addr`] of a tensor on CUDA.
pub fn tensor_addr(t: &Tensor) -> Result<u64> {
    let (st, l) = t.storage_and_layout();
    let Storage::Cuda(cs) = &*st else { candle_core::bail!("zoo-kernels: tensor not on CUDA") };
    storage_addr(cs, l)
}

/// An uninitialised contiguous buffer of `n` elements of `dt` (f32, bf16, f16) on `dev`, and its
/// address: for kernels that write every element.
pub fn alloc(dev: &candle_core::CudaDevice, dt: DType, n: usize) -> Result<(CudaStorage, u64)> {
    let n = n.max(1);
    // SAFETY (all three): the caller's kernel writes every element before anything reads it.
    let cs = match dt {
        DType::F32 => CudaStorage::wrap_cuda_slice(unsafe { dev.alloc::<f32>(n)? }, dev.clone()),
        DType::BF16 => CudaStorage::wrap_cuda_slice(unsafe { dev.alloc::<half::bf16>(n)? }, dev.clone()),
        DType::F16 => CudaStorage::wrap_cuda_slice(unsafe { dev.alloc::<half::f16>(n)? }, dev.clone()),
        t => candle_core::bail!("zoo-kernels: no buffer of dtype {t:?}"),
    };
    let a = storage_addr(&cs, &Layout::contiguous(n))?;
    Ok((cs, a))
}

/// The kernel-name suffix of an element type.
pub fn suffix(dt: DType) -> Result<&'static str> {
    Ok(match dt {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        t => candle_core::bail!("zoo-kernels: no kernel for dtype {t:?}"),
    })
}
