//! Setting up the cuBLAS handle each device owns.

use cudarc::cublas::{sys as blas_sys, CudaBlas};

use crate::error::{Error, Result};

/// Puts a fresh cuBLAS handle into strict FP32: the default math mode (no TF32 tensor-op
/// down-conversion, no BF16x9 emulation, even when the environment asks for them), checked by
/// reading it back. Every GEMM of the engine also names `CUBLAS_COMPUTE_32F` explicitly.
pub(crate) fn configure_strict_fp32(blas: &CudaBlas) -> Result<()> {
    let handle = *blas.handle();
    let wanted = blas_sys::cublasMath_t::CUBLAS_DEFAULT_MATH;
    // SAFETY: `handle` is the live handle owned by `blas`; setting its math mode touches nothing else.
    unsafe { blas_sys::cublasSetMathMode(handle, wanted) }
        .result()
        .map_err(Error::blas("setting the cuBLAS math mode to strict FP32"))?;
    let mut mode = std::mem::MaybeUninit::uninit();
    // SAFETY: as above; cuBLAS writes the mode into `mode` before returning success.
    let mode = unsafe {
        blas_sys::cublasGetMathMode(handle, mode.as_mut_ptr())
            .result()
            .map_err(Error::blas("reading back the cuBLAS math mode"))?;
        mode.assume_init()
    };
    if mode != wanted {
        return Err(Error::CudaUnavailable(format!("cuBLAS kept math mode {mode:?} instead of strict FP32")));
    }
    Ok(())
}
