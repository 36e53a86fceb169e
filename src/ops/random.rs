//! Random tensors: standard normal noise from the counter-based generator of [`crate::philox`],
//! identical bit for bit on every device. Kernel: `kernels/philox.cu`. Tests: `tests/philox.rs`.

use cudarc::driver::PushKernelArg;

use super::{cuda_output, launch};
use crate::cuda::{launch_elements, KernelFamily};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::philox::fill_normal;
use crate::tensor::{host_buffer, Tensor};

/// A tensor of `shape` on `device` whose element `i` (row-major) is
/// [`normal(seed, stream, i)`](crate::philox::normal). A leaf: it carries no gradient.
pub fn normal_noise(device: &Device, shape: &[usize], seed: u64, stream: u64) -> Result<Tensor> {
    let n = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::shape("normal_noise", format!("shape {shape:?} has more elements than fit in memory")))?;
    match device {
        Device::Cpu => {
            let mut data = host_buffer(n);
            fill_normal(seed, stream, &mut data);
            Tensor::from_vec(data, shape)
        }
        Device::Cuda(dev) => {
            let mut out = dev.alloc(n)?;
            if n > 0 {
                let f = dev.function(KernelFamily::Philox, "philox_normal")?;
                let n_u64 = n as u64;
                let mut b = dev.stream().launch_builder(&f);
                b.arg(&mut out).arg(&n_u64).arg(&seed).arg(&stream);
                // SAFETY: arguments match `philox_normal(float*, unsigned long long n,
                // unsigned long long seed, unsigned long long stream)`; `out` holds n floats and the
                // kernel writes exactly elements 0..n. One thread per Philox block of 4 elements.
                launch("philox_normal", unsafe { b.launch(launch_elements(n.div_ceil(4))) })?;
            }
            Ok(cuda_output(dev, out, shape))
        }
    }
}
