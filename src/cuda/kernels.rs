//! The kernel families in `kernels/*.cu` and how their PTX is obtained: built by nvcc in build.rs
//! when a toolkit was present at build time, compiled by NVRTC at run time otherwise.

use cudarc::nvrtc::{CompileOptions, Ptx};

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
/// NVRTC for the device's own architecture.
pub(crate) fn ptx_for(family: KernelFamily, cc: (i32, i32)) -> Result<Ptx> {
    match family.prebuilt_ptx() {
        Some(ptx) if cc.0 >= 9 => Ok(Ptx::from_src(ptx)),
        _ => compile_with_nvrtc(family, nvrtc_arch(cc)),
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
        ftz: Some(false),
        prec_div: Some(true),
        prec_sqrt: Some(true),
        arch: Some(arch),
        options: vec!["--std=c++17".into(), "--generate-line-info".into()],
        name: Some(format!("{}.cu", family.stem())),
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(family.source(), options)
        .map_err(|e| Error::KernelCompile { family: family.stem(), log: e.to_string() })
}
