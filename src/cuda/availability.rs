//! Whether CUDA can be used here, and if not, why: the libraries, a device, and kernels that load.

use std::sync::OnceLock;

use cudarc::driver::CudaContext;

use super::device::CudaDevice;
use super::kernels::{nvrtc_arch, KernelFamily};

/// What the run-time probes found, before any context exists.
#[derive(Clone, Debug)]
pub struct RuntimeProbes {
    pub driver_library: bool,
    pub cublas_library: bool,
    /// The driver's device count, or its error when it failed to start.
    pub devices: Result<i32, String>,
}

/// Why the probed libraries and devices cannot run the engine, or `None` when they can.
pub fn runtime_reason(p: &RuntimeProbes) -> Option<String> {
    if !p.driver_library {
        return Some("no CUDA driver library (libcuda.so) found".into());
    }
    if !p.cublas_library {
        return Some("no cuBLAS library (libcublas.so) found".into());
    }
    match &p.devices {
        Ok(n) if *n > 0 => None,
        Ok(_) => Some("the CUDA driver reports no device".into()),
        Err(e) => Some(format!("the CUDA driver failed to start: {e}")),
    }
}

/// Where a family's PTX comes from on a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PtxSource {
    /// The sm_90 PTX nvcc built at compile time.
    Prebuilt,
    /// NVRTC at run time, for this `--gpu-architecture`.
    Nvrtc(&'static str),
}

/// Where kernels come from for a device of compute capability `cc`, given whether nvcc built PTX
/// and whether libnvrtc loads; the error says why neither works.
pub fn kernel_ptx_source(has_prebuilt: bool, cc: (i32, i32), nvrtc_present: bool) -> Result<PtxSource, String> {
    // nvcc's PTX targets sm_90: the driver JIT-compiles it for Hopper and newer only.
    if has_prebuilt && cc.0 >= 9 {
        return Ok(PtxSource::Prebuilt);
    }
    if nvrtc_present {
        return Ok(PtxSource::Nvrtc(nvrtc_arch(cc)));
    }
    let why_no_ptx = if has_prebuilt {
        format!("the nvcc-built sm_90 PTX cannot run on compute capability {}.{}", cc.0, cc.1)
    } else {
        "the build found no nvcc, so no PTX was built".to_string()
    };
    Err(format!("{why_no_ptx}, and libnvrtc (needed to compile the kernels at run time) cannot be loaded"))
}

fn probe_runtime() -> RuntimeProbes {
    // SAFETY: these functions only try to dlopen the named library and report whether it was
    // found; they call nothing inside it.
    let driver_library = unsafe { cudarc::driver::sys::is_culib_present() };
    // SAFETY: as above, a dlopen probe only.
    let cublas_library = driver_library && unsafe { cudarc::cublas::sys::is_culib_present() };
    // Only touch the driver when its library exists (cudarc panics otherwise).
    let devices =
        if driver_library && cublas_library { CudaContext::device_count().map_err(|e| e.to_string()) } else { Ok(0) };
    RuntimeProbes { driver_library, cublas_library, devices }
}

/// Why the CUDA libraries or devices are unusable, or `None`; computed once per process. This is
/// the part [`CudaDevice::new`] needs before it may create a context.
pub(crate) fn runtime_unavailable_reason() -> Option<&'static str> {
    static REASON: OnceLock<Option<String>> = OnceLock::new();
    REASON.get_or_init(|| runtime_reason(&probe_runtime())).as_deref()
}

/// Why CUDA cannot be used here, or `None` when the driver, cuBLAS and a device are present and
/// device 0 loads every kernel family (prebuilt PTX, or NVRTC compiles it). Computed once per
/// process; loading the families here also warms the module cache the ops use.
pub fn unavailable_reason() -> Option<&'static str> {
    static REASON: OnceLock<Option<String>> = OnceLock::new();
    REASON
        .get_or_init(|| {
            if let Some(reason) = runtime_unavailable_reason() {
                return Some(reason.to_string());
            }
            let loaded = CudaDevice::new(0)
                .and_then(|dev| KernelFamily::ALL.iter().try_for_each(|&family| dev.module(family).map(|_| ())));
            loaded.err().map(|e| format!("device 0 cannot load the CUDA kernels: {e}"))
        })
        .as_deref()
}

/// True when a GPU can be used. Gate every first touch of CUDA with this (docs/architecture.md §3).
pub fn gpu_available() -> bool {
    unavailable_reason().is_none()
}

/// True when the NVRTC library can be loaded (it is needed only when build.rs found no nvcc).
pub fn nvrtc_available() -> bool {
    // SAFETY: a dlopen probe; nothing inside the library is called.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}
