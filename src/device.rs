//! Where a tensor lives.

use std::sync::Arc;

use crate::cuda::CudaDevice;
use crate::error::Result;

/// The CPU, or one GPU. Cloning is cheap (the GPU side is shared).
#[derive(Clone, Debug)]
pub enum Device {
    Cpu,
    Cuda(Arc<CudaDevice>),
}

impl Device {
    /// GPU `ordinal`, or an error saying why CUDA cannot be used here.
    pub fn cuda(ordinal: usize) -> Result<Device> {
        Ok(Device::Cuda(CudaDevice::new(ordinal)?))
    }

    /// Parses a user's `--device` value: `cpu`, `cuda` or `cuda:N`.
    pub fn parse(spec: &str) -> Result<Device> {
        match spec {
            "cpu" => Ok(Device::Cpu),
            "cuda" | "gpu" => Device::cuda(0),
            _ => match spec.strip_prefix("cuda:").and_then(|n| n.parse().ok()) {
                Some(ordinal) => Device::cuda(ordinal),
                None => {
                    Err(crate::Error::Invalid(format!("unknown device `{spec}`: expected `cpu`, `cuda` or `cuda:N`")))
                }
            },
        }
    }

    pub fn is_cuda(&self) -> bool {
        matches!(self, Device::Cuda(_))
    }

    /// True when both name the same place (same GPU ordinal, or both the CPU).
    pub fn same_as(&self, other: &Device) -> bool {
        match (self, other) {
            (Device::Cpu, Device::Cpu) => true,
            (Device::Cuda(a), Device::Cuda(b)) => a.ordinal() == b.ordinal(),
            _ => false,
        }
    }

    pub fn name(&self) -> String {
        match self {
            Device::Cpu => "cpu".into(),
            Device::Cuda(d) => format!("cuda:{}", d.ordinal()),
        }
    }

    /// Waits for queued GPU work (a no-op on the CPU); used by timings and before host reads.
    pub fn synchronize(&self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            Device::Cuda(d) => d.synchronize(),
        }
    }
}
