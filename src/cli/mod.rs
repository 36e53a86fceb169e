//! One file per subcommand that has grown beyond a few lines: argument struct and the glue from
//! arguments to the library. Nothing here is needed by a library user.

pub mod synth;
pub mod train;

use std::path::Path;

use mcs_engine::cuda::gpu_available;
use mcs_engine::model::ModelConfig;
use mcs_engine::{Device, Result};

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
    match spec {
        "auto" if gpu_available() => Device::cuda(0),
        "auto" => Ok(Device::Cpu),
        other => Device::parse(other),
    }
}
