//! One file per subcommand that has grown beyond a few lines: argument struct and the glue from
//! arguments to the library. Nothing here is needed by a library user.

pub mod bench;
pub mod eval;
pub mod predict;
pub mod synth;
pub mod train;

use std::path::Path;

use mcs_engine::data::Split;
use mcs_engine::model::ModelConfig;
use mcs_engine::{Device, Error, Result};

/// Keeps large freed buffers in the process instead of giving them back to the OS at once.
///
/// Every op allocates its output, and glibc serves big allocations with fresh `mmap`s (and trims
/// the heap eagerly), so each training step re-faults hundreds of megabytes of zeroed pages.
/// Raising the mmap and trim thresholds lets those buffers be reused: measured 18 % more
/// images/s for `train` on the 2-core CI machine. Other platforms keep their allocator's defaults.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const MIB: i32 = 1 << 20;
        // SAFETY: mallopt only sets allocator parameters; it is called before any other thread
        // exists, and an unsupported value is reported by a 0 return, which we may ignore.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * MIB);
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
            libc::mallopt(libc::M_TOP_PAD, 256 * MIB);
        }
    }
}

/// A preset name or a config.json path.
pub fn load_config(spec: &str) -> Result<ModelConfig> {
    let path = Path::new(spec);
    if path.is_file() {
        ModelConfig::load(path)
    } else {
        ModelConfig::preset(spec)
    }
}

/// `auto` (the GPU when one can be used, else the CPU), `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(spec: &str) -> Result<Device> {
    mcs_engine::segment::select_device(spec)
}

/// `Train`, `Val` or `Test` (any case).
pub fn parse_split(name: &str) -> Result<Split> {
    Split::ALL
        .into_iter()
        .find(|s| s.name().eq_ignore_ascii_case(name))
        .ok_or_else(|| Error::Invalid(format!("unknown split `{name}`: expected Train, Val or Test")))
}
