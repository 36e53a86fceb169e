//! The op surface. One module per family; each holds the differentiable op (forward + the
//! backward rule it records on the tape), its untracked forward/backward functions, the CPU
//! reference implementation and the CUDA launchers for `kernels/<family>.cu`.
//!
//! Differentiable ops take the [`Tape`](crate::tape::Tape) first. `*_forward` / `*_backward`
//! functions are untracked: backward rules call only those, so replaying the tape records nothing.

pub mod adam;
pub mod attention;
pub mod batchnorm;
pub mod conv;
pub mod dhn_nce;
pub mod dropout;
pub mod eca;
pub mod elementwise;
pub mod flops;
pub mod layernorm;
pub mod loss;
pub mod matmul;
pub mod movement;
pub mod pool;
pub mod prob_attention;
pub mod random;
pub mod reduce;
pub mod softcon;
pub mod softmax;
pub mod spatial;
pub(crate) mod strided;

pub use adam::*;
pub use attention::*;
pub use batchnorm::*;
pub use conv::*;
pub use dhn_nce::*;
pub use dropout::*;
pub use eca::*;
pub use elementwise::*;
pub use layernorm::*;
pub use loss::*;
pub use matmul::*;
pub use movement::*;
pub use pool::*;
pub use prob_attention::*;
pub use random::*;
pub use reduce::*;
pub use softcon::*;
pub use softmax::*;
pub use spatial::*;

use std::sync::Arc;

use cudarc::driver::{CudaSlice, DriverError};

use crate::cuda::CudaDevice;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::{Storage, Tensor};

/// Passed for an optional pointer argument that is absent (kernels test it against null).
pub(crate) const NULL_DEVICE_PTR: u64 = 0;

/// A size as the `int` a kernel takes, or an error instead of a silent wrap-around.
pub(crate) fn kernel_int(op: &'static str, what: &str, value: usize) -> Result<i32> {
    i32::try_from(value).map_err(|_| Error::shape(op, format!("{what} = {value} exceeds the kernels' 32-bit sizes")))
}

/// The device all `tensors` share, or an error naming `op` and the two devices.
pub(crate) fn same_device(op: &'static str, tensors: &[&Tensor]) -> Result<Device> {
    let first = tensors.first().map(|t| t.device()).unwrap_or(Device::Cpu);
    for t in &tensors[1..] {
        let d = t.device();
        if !d.same_as(&first) {
            return Err(Error::DeviceMismatch { op, left: first.name(), right: d.name() });
        }
    }
    Ok(first)
}

/// The device buffer of a CUDA tensor.
pub(crate) fn cuda_slice(t: &Tensor) -> Result<&CudaSlice<f32>> {
    match t.storage() {
        Storage::Cuda { data, .. } => Ok(data),
        Storage::Cpu(_) => Err(Error::shape("cuda op", "expected a CUDA tensor, got a CPU one")),
    }
}

/// Wraps a kernel's output buffer as a tensor.
pub(crate) fn cuda_output(dev: &Arc<CudaDevice>, data: CudaSlice<f32>, shape: &[usize]) -> Tensor {
    Tensor::from_storage(Storage::Cuda { device: dev.clone(), data }, shape.to_vec())
}

/// Turns a launch result into an engine error naming the kernel; under `MCS_SYNC_LAUNCHES=1`
/// also waits for the kernel and names it if it faulted ([`crate::cuda::after_launch`]).
pub(crate) fn launch<T>(kernel: &str, result: std::result::Result<T, DriverError>) -> Result<()> {
    result.map(|_| ()).map_err(Error::driver(format!("launching kernel `{kernel}`")))?;
    crate::cuda::after_launch(kernel)
}
