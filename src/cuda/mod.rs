//! The CUDA side of the engine: finding a usable GPU without panicking, one context + stream +
//! cuBLAS handle per device, and a cache of kernel modules loaded on first use.
//!
//! Everything here compiles on a machine with no CUDA at all: cudarc loads the driver, NVRTC and
//! cuBLAS libraries with dlopen on first use, and [`gpu_available`] checks that they exist before
//! anything touches them (cudarc panics rather than returning an error when a library is missing).

pub mod kernels;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, LaunchConfig};

use crate::error::{Error, Result};
pub use kernels::KernelFamily;

/// Why CUDA cannot be used here, or `None` when a driver, NVRTC, cuBLAS and a device are present.
/// Computed once per process.
pub fn unavailable_reason() -> Option<&'static str> {
    static REASON: OnceLock<Option<String>> = OnceLock::new();
    REASON
        .get_or_init(|| {
            // SAFETY: these functions only try to dlopen the named library and report whether it
            // was found; they call nothing inside it.
            let driver = unsafe { cudarc::driver::sys::is_culib_present() };
            if !driver {
                return Some("no CUDA driver library (libcuda.so) found".into());
            }
            // SAFETY: as above, a dlopen probe only.
            if !unsafe { cudarc::cublas::sys::is_culib_present() } {
                return Some("no cuBLAS library (libcublas.so) found".into());
            }
            match CudaContext::device_count() {
                Ok(n) if n > 0 => None,
                Ok(_) => Some("the CUDA driver reports no device".into()),
                Err(e) => Some(format!("the CUDA driver failed to start: {e}")),
            }
        })
        .as_deref()
}

/// True when a GPU can be used. Gate every first touch of CUDA with this (ENGINE.md §2).
pub fn gpu_available() -> bool {
    unavailable_reason().is_none()
}

/// True when the NVRTC library can be loaded (it is needed only when build.rs found no nvcc).
pub fn nvrtc_available() -> bool {
    // SAFETY: a dlopen probe; nothing inside the library is called.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// One GPU: its context, the stream every op of the engine runs on, a cuBLAS handle bound to that
/// stream, and the kernel modules loaded so far.
pub struct CudaDevice {
    ordinal: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    modules: Mutex<HashMap<KernelFamily, Arc<CudaModule>>>,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cuda:{}", self.ordinal)
    }
}

impl CudaDevice {
    /// Opens GPU `ordinal`. Returns [`Error::CudaUnavailable`] instead of panicking when there is
    /// no usable CUDA installation or no such device.
    pub fn new(ordinal: usize) -> Result<Arc<Self>> {
        if let Some(reason) = unavailable_reason() {
            return Err(Error::CudaUnavailable(reason.to_string()));
        }
        let count = CudaContext::device_count().map_err(Error::driver("counting devices"))?;
        if ordinal >= count as usize {
            return Err(Error::CudaUnavailable(format!("device {ordinal} requested but only {count} present")));
        }
        let ctx = CudaContext::new(ordinal).map_err(Error::driver(format!("opening device {ordinal}")))?;
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(stream.clone()).map_err(Error::blas("creating the cuBLAS handle"))?;
        crate::ops::matmul::configure_strict_fp32(&blas)?;
        Ok(Arc::new(CudaDevice { ordinal, ctx, stream, blas, modules: Mutex::new(HashMap::new()) }))
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn blas(&self) -> &CudaBlas {
        &self.blas
    }

    /// The kernel `name` from `family`, loading (and, without prebuilt PTX, compiling) the family's
    /// module the first time it is asked for.
    pub fn function(&self, family: KernelFamily, name: &str) -> Result<CudaFunction> {
        let module = {
            let mut modules = self.modules.lock().expect("kernel module cache poisoned");
            match modules.get(&family) {
                Some(m) => m.clone(),
                None => {
                    let cc = self.ctx.compute_capability().map_err(Error::driver("reading the compute capability"))?;
                    let ptx = kernels::ptx_for(family, cc)?;
                    let m = self
                        .ctx
                        .load_module(ptx)
                        .map_err(Error::driver(format!("loading kernels/{}.cu", family.stem())))?;
                    modules.insert(family, m.clone());
                    m
                }
            }
        };
        module
            .load_function(name)
            .map_err(Error::driver(format!("finding kernel `{name}` in kernels/{}.cu", family.stem())))
    }

    /// A device buffer of `len` zeros.
    pub fn zeros(&self, len: usize) -> Result<CudaSlice<f32>> {
        self.stream.alloc_zeros(len.max(1)).map_err(Error::driver(format!("allocating {len} floats")))
    }

    /// A device buffer whose contents a kernel will overwrite entirely.
    pub fn alloc(&self, len: usize) -> Result<CudaSlice<f32>> {
        // SAFETY: callers pass the buffer to a kernel that writes every element before anything
        // reads it; uninitialised device memory is never read.
        unsafe { self.stream.alloc::<f32>(len.max(1)) }.map_err(Error::driver(format!("allocating {len} floats")))
    }

    pub fn upload(&self, data: &[f32]) -> Result<CudaSlice<f32>> {
        if data.is_empty() {
            return self.zeros(0);
        }
        self.stream.clone_htod(data).map_err(Error::driver(format!("copying {} floats to the GPU", data.len())))
    }

    pub fn download(&self, data: &CudaSlice<f32>, len: usize) -> Result<Vec<f32>> {
        let mut all = self.stream.clone_dtoh(data).map_err(Error::driver("copying a tensor to the host"))?;
        all.truncate(len);
        Ok(all)
    }

    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(Error::driver("synchronising the stream"))
    }
}

/// Threads per block for the simple one-thread-per-element kernels.
pub const BLOCK: u32 = 256;

/// A launch with one thread per element (grid-stride loops in the kernels cover any `n`).
pub fn launch_elements(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(BLOCK as usize).clamp(1, 65_535 * 8) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

/// A launch with one block per row, `threads` threads cooperating on each row.
pub fn launch_rows(rows: usize, threads: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows.max(1) as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
}
