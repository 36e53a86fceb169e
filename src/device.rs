//! Where a tensor lives.

use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::CudaEvent;

use crate::cuda::CudaDevice;
use crate::error::{Error, Result};

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

    /// True on the emulated GPU of `tools/emulated_gpu.sh`, whose timings are no GPU figures.
    pub fn is_emulated(&self) -> bool {
        matches!(self, Device::Cuda(d) if d.is_emulated())
    }

    /// Waits for queued GPU work (a no-op on the CPU); used by timings and before host reads.
    pub fn synchronize(&self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            Device::Cuda(d) => d.synchronize(),
        }
    }

    /// What [`Device::time_mark`] reads here: `host clock` or `cuda events` (reports name it).
    pub fn clock(&self) -> &'static str {
        match self {
            Device::Cpu => "host clock",
            Device::Cuda(_) => "cuda events",
        }
    }

    /// Now, on this device's clock: the host clock on the CPU; on a GPU a CUDA event at the end
    /// of the stream so far, which the GPU stamps when it gets there.
    pub fn time_mark(&self) -> Result<TimeMark> {
        match self {
            Device::Cpu => Ok(TimeMark::Host(Instant::now())),
            Device::Cuda(d) => Ok(TimeMark::Cuda(d.record_timing_event()?)),
        }
    }

    /// Seconds that `work` takes on this device's clock: from a drained queue until the device
    /// has done what `work` queued. The queue is drained again afterwards, which also surfaces a
    /// fault that the queued work raised after its last launch.
    pub fn time(&self, work: impl FnOnce() -> Result<()>) -> Result<f64> {
        self.synchronize()?;
        let start = self.time_mark()?;
        work()?;
        let end = self.time_mark()?;
        let seconds = start.seconds_until(&end)?;
        self.synchronize()?;
        Ok(seconds)
    }
}

/// A point in time on one device's clock ([`Device::time_mark`]).
pub enum TimeMark {
    Host(Instant),
    Cuda(CudaEvent),
}

impl TimeMark {
    /// Seconds from this mark to `later`, a mark of the same device; on a GPU this waits until
    /// the GPU has reached `later`.
    pub fn seconds_until(&self, later: &TimeMark) -> Result<f64> {
        match (self, later) {
            (TimeMark::Host(start), TimeMark::Host(end)) => Ok(end.saturating_duration_since(*start).as_secs_f64()),
            (TimeMark::Cuda(start), TimeMark::Cuda(end)) => crate::cuda::seconds_between(start, end),
            _ => Err(Error::Invalid("a host time mark and a GPU time mark cannot be compared".into())),
        }
    }
}
