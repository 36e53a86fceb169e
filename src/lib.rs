//! mcs-engine: trains and runs MedCLIPSeg on the CPU and on NVIDIA GPUs.
//!
//! Layers, bottom up: [`files`] (crash-safe writes), [`fastmath`] (the branch-free, vectorised f32 maths of the CPU kernels),
//! [`tensor`] (shape + storage on a [`device`]), [`cuda`] (context, kernel modules, cuBLAS),
//! [`ops`] (every op with its CPU reference, CUDA launcher and backward rule), [`tape`]
//! (reverse-mode autograd), [`philox`] (counter-based noise identical on every backend); then
//! [`model`], [`data`] and [`train`]; on top, [`segment`] (the embeddable inference API: load a
//! model folder once, segment images from prompts), [`saliency`] (zero-shot M2IB saliency and SAM
//! prompts) and [`eval`] (DSC, NSD, calibration).

pub mod cuda;
pub mod data;
pub mod device;
pub mod error;
pub mod eval;
pub mod fastmath;
pub mod files;
pub mod imaging;
pub mod limits;
pub mod model;
pub mod ops;
pub mod philox;
pub mod saliency;
pub mod segment;
pub mod tape;
pub mod tensor;
pub mod tokenizer;
pub mod train;
pub mod volume;

pub use device::Device;
pub use error::{Error, Result};
pub use segment::{Options, Segmentation, Segmenter};
pub use tape::{Gradients, Tape};
pub use tensor::Tensor;
