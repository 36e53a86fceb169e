//! The CUDA side of the engine: finding a usable GPU without panicking, one context + owned
//! stream + cuBLAS handle per device (kept for the life of the process), kernel modules loaded on
//! first use, and the launch helpers every op shares.
//!
//! Everything here compiles on a machine with no CUDA at all: cudarc loads the driver, NVRTC and
//! cuBLAS libraries with dlopen on first use, and [`gpu_available`] checks that they exist before
//! anything touches them (cudarc panics rather than returning an error when a library is missing).

mod availability;
mod blas;
mod device;
pub mod kernels;

pub use availability::{
    gpu_available, kernel_ptx_source, nvrtc_available, runtime_reason, unavailable_reason, PtxSource, RuntimeProbes,
};
pub use device::{seconds_between, CudaDevice, OrdinalCache};
pub use kernels::{Kernel, KernelFamily};

use cudarc::driver::LaunchConfig;

use crate::error::{Error, Result};

/// Threads per block for the simple one-thread-per-element kernels.
pub const BLOCK: u32 = 256;

/// A launch with one thread per element (grid-stride loops in the kernels cover any `n`).
pub fn launch_elements(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(BLOCK as usize).clamp(1, 65_535 * 8) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

/// The most blocks a grid may have along x (2^31 - 1).
pub const MAX_GRID_X: usize = i32::MAX as usize;

/// A launch with one block per row, `threads` threads cooperating on each row. The kernels have
/// no grid-stride loop over rows, so more rows than a grid holds is an error, not a truncation.
pub fn launch_rows(rows: usize, threads: u32) -> Result<LaunchConfig> {
    if rows > MAX_GRID_X {
        return Err(Error::shape(
            "launch_rows",
            format!("{rows} rows exceed the {MAX_GRID_X} blocks a CUDA grid can have along x"),
        ));
    }
    Ok(LaunchConfig { grid_dim: (rows.max(1) as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 })
}

/// The environment switch that makes every launch synchronous (a debugging aid: a faulting kernel
/// is then reported under its own name instead of at the next host copy).
pub const SYNC_LAUNCHES_VAR: &str = "MCS_SYNC_LAUNCHES";

/// Whether a value of [`SYNC_LAUNCHES_VAR`] asks for synchronous launches (`1`, `true`, `yes`).
pub fn sync_launches_requested(value: Option<&str>) -> bool {
    value.is_some_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes"))
}

/// [`sync_launches_requested`] for this process's environment, read once.
pub fn sync_launches() -> bool {
    static SYNC: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SYNC.get_or_init(|| sync_launches_requested(std::env::var(SYNC_LAUNCHES_VAR).ok().as_deref()))
}

/// Called after every kernel launch and cuBLAS call (`what` names it). Under
/// `MCS_SYNC_LAUNCHES=1` it waits for the thread's current context (cudarc binds the launching
/// device's context before each launch) and turns a fault into an error naming `what`; otherwise
/// it does nothing.
pub fn after_launch(what: &str) -> Result<()> {
    if !sync_launches() {
        return Ok(());
    }
    cudarc::driver::result::ctx::synchronize()
        .map_err(Error::driver(format!("running `{what}` ({SYNC_LAUNCHES_VAR}=1 synchronises after every launch)")))
}
