//! The kernel families in `kernels/*.cu` and how their PTX is obtained: built by nvcc in build.rs
//! when a toolkit was present at build time, compiled by NVRTC at run time otherwise.

use std::sync::OnceLock;

use cudarc::driver::sys::CUfunction_attribute_enum;
use cudarc::driver::CudaFunction;
use cudarc::nvrtc::{CompileOptions, Ptx};

use super::availability::{kernel_ptx_source, PtxSource};
use super::device::CudaDevice;
use crate::error::{Error, Result};

/// One `kernels/<stem>.cu` file as embedded by build.rs.
pub(crate) struct KernelSource {
    pub stem: &'static str,
    /// The source with local `#include "…"` files spliced in, ready for NVRTC.
    pub source: &'static str,
    /// PTX built by nvcc for sm_90, when build.rs found nvcc.
    pub ptx: Option<&'static str>,
}

include!(concat!(env!("OUT_DIR"), "/kernel_table.rs"));

/// One variant per `kernels/<stem>.cu`. A test checks that this list and the files agree.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum KernelFamily {
    Elementwise,
    LayerNorm,
    Softmax,
    Reduce,
    Movement,
    Philox,
    Spatial,
    ProbAttention,
    Adam,
    Dropout,
    Loss,
    SoftCon,
}

impl KernelFamily {
    pub const ALL: &'static [KernelFamily] = &[
        KernelFamily::Elementwise,
        KernelFamily::LayerNorm,
        KernelFamily::Softmax,
        KernelFamily::Reduce,
        KernelFamily::Movement,
        KernelFamily::Philox,
        KernelFamily::Spatial,
        KernelFamily::ProbAttention,
        KernelFamily::Adam,
        KernelFamily::Dropout,
        KernelFamily::Loss,
        KernelFamily::SoftCon,
    ];

    /// The file name under `kernels/` without `.cu`.
    pub fn stem(self) -> &'static str {
        match self {
            KernelFamily::Elementwise => "elementwise",
            KernelFamily::LayerNorm => "layernorm",
            KernelFamily::Softmax => "softmax",
            KernelFamily::Reduce => "reduce",
            KernelFamily::Movement => "movement",
            KernelFamily::Philox => "philox",
            KernelFamily::Spatial => "spatial",
            KernelFamily::ProbAttention => "prob_attention",
            KernelFamily::Adam => "adam",
            KernelFamily::Dropout => "dropout",
            KernelFamily::Loss => "loss",
            KernelFamily::SoftCon => "softcon",
        }
    }

    fn embedded(self) -> &'static KernelSource {
        KERNEL_SOURCES
            .iter()
            .find(|k| k.stem == self.stem())
            .unwrap_or_else(|| panic!("kernels/{}.cu is missing from the build", self.stem()))
    }

    /// The kernel source as NVRTC sees it.
    pub fn source(self) -> &'static str {
        self.embedded().source
    }

    /// The PTX nvcc built at compile time, if any.
    pub fn prebuilt_ptx(self) -> Option<&'static str> {
        self.embedded().ptx
    }
}

/// Stems of every embedded `kernels/*.cu` (for the test that the enum is complete).
pub fn embedded_stems() -> Vec<&'static str> {
    KERNEL_SOURCES.iter().map(|k| k.stem).collect()
}

/// PTX for a device of compute capability `cc`: nvcc's sm_90 PTX on Hopper or newer, otherwise
/// NVRTC for the device's own architecture (see [`kernel_ptx_source`]).
pub(crate) fn ptx_for(family: KernelFamily, cc: (i32, i32)) -> Result<Ptx> {
    let prebuilt = family.prebuilt_ptx();
    let source = kernel_ptx_source(prebuilt.is_some(), cc, super::nvrtc_available())
        .map_err(|why| Error::CudaUnavailable(format!("kernels/{}.cu: {why}", family.stem())))?;
    match (source, prebuilt) {
        (PtxSource::Prebuilt, Some(ptx)) => Ok(Ptx::from_src(ptx)),
        (PtxSource::Nvrtc(arch), _) => compile_with_nvrtc(family, arch),
        (PtxSource::Prebuilt, None) => unreachable!("kernel_ptx_source picks prebuilt PTX only when it exists"),
    }
}

/// The NVRTC `--gpu-architecture` value for a compute capability (cudarc wants a `'static str`).
pub fn nvrtc_arch(cc: (i32, i32)) -> &'static str {
    match cc {
        (7, 0) => "compute_70",
        (7, 5) => "compute_75",
        (8, 0) => "compute_80",
        (8, 6) => "compute_86",
        (8, 9) => "compute_89",
        (9, 0) => "compute_90",
        (10, 0) => "compute_100",
        (12, 0) => "compute_120",
        (major, _) if major >= 10 => "compute_100",
        _ => "compute_80",
    }
}

/// Compiles one family with NVRTC, with the same floating-point options build.rs gives nvcc.
pub fn compile_with_nvrtc(family: KernelFamily, arch: &'static str) -> Result<Ptx> {
    if !super::nvrtc_available() {
        return Err(Error::CudaUnavailable(format!(
            "kernels/{}.cu has no prebuilt PTX and libnvrtc cannot be loaded",
            family.stem()
        )));
    }
    let options = CompileOptions {
        arch: Some(arch),
        options: nvrtc_options(),
        name: Some(format!("{}.cu", family.stem())),
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(family.source(), options)
        .map_err(|e| Error::KernelCompile { family: family.stem(), log: e.to_string() })
}

/// NVRTC's options: the floating-point flags build.rs gives nvcc (the same constant, so the two
/// compilers cannot drift apart), then the language standard and line info.
pub fn nvrtc_options() -> Vec<String> {
    let mut options: Vec<String> = FLOAT_FLAGS.iter().map(|f| f.to_string()).collect();
    options.extend(["--std=c++17".to_string(), "--generate-line-info".to_string()]);
    options
}

// The floating-point flags every kernel is compiled with, by nvcc (build.rs includes the same
// file) and by NVRTC: see the file for the policy and why Philox stays bit-exact.
include!("float_flags.rs");

/// [`FLOAT_FLAGS`] for callers outside this module (tests, tools).
pub fn float_flags() -> &'static [&'static str] {
    &FLOAT_FLAGS
}

/// The most device ordinals a [`Kernel`] handle caches a function for.
pub const MAX_KERNEL_DEVICES: usize = 16;

/// Shared memory a block may use without opting in.
const DEFAULT_DYNAMIC_SHARED_BYTES: u32 = 48 * 1024;

/// A kernel named once in a `static`: its function is looked up once per device and then read
/// without a lock or a name lookup (one atomic load per launch). Valid for the process's life
/// because devices are never closed (see [`CudaDevice::new`]).
pub struct Kernel {
    family: KernelFamily,
    name: &'static str,
    /// The most dynamic shared memory any launch of this kernel uses; above the default 48 KiB the
    /// kernel is opted in once, when its function is first loaded (never per launch, where
    /// threads with different sizes would race on the attribute).
    max_dynamic_shared_bytes: u32,
    per_device: [OnceLock<CudaFunction>; MAX_KERNEL_DEVICES],
}

impl Kernel {
    pub const fn new(family: KernelFamily, name: &'static str) -> Kernel {
        Kernel::with_shared_memory(family, name, 0)
    }

    /// A kernel whose launches use at most `max_dynamic_shared_bytes` of dynamic shared memory.
    pub const fn with_shared_memory(
        family: KernelFamily,
        name: &'static str,
        max_dynamic_shared_bytes: usize,
    ) -> Kernel {
        Kernel {
            family,
            name,
            max_dynamic_shared_bytes: max_dynamic_shared_bytes as u32,
            per_device: [const { OnceLock::new() }; MAX_KERNEL_DEVICES],
        }
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn max_dynamic_shared_bytes(&self) -> usize {
        self.max_dynamic_shared_bytes as usize
    }

    /// The kernel's function on `dev`, loaded (and opted in to its shared memory) on first use.
    pub fn function(&self, dev: &CudaDevice) -> Result<&CudaFunction> {
        let Some(slot) = self.per_device.get(dev.ordinal()) else {
            return Err(Error::CudaUnavailable(format!(
                "kernel handles cover devices 0..{MAX_KERNEL_DEVICES}, not cuda:{}",
                dev.ordinal()
            )));
        };
        if let Some(f) = slot.get() {
            return Ok(f);
        }
        let f = dev.load_function(self.family, self.name)?;
        if self.max_dynamic_shared_bytes > DEFAULT_DYNAMIC_SHARED_BYTES {
            let bytes = self.max_dynamic_shared_bytes;
            f.set_attribute(CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, bytes as i32)
                .map_err(Error::driver(format!("granting `{}` {bytes} bytes of shared memory", self.name)))?;
        }
        // Two threads may both get here; both set the same attribute, and one function is kept.
        Ok(slot.get_or_init(|| f))
    }
}
