//! One error type for the whole engine. Every variant names what was at fault (the op, the key,
//! the file, the value) so that a user sees a sentence, never a panic backtrace.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An op got tensors whose shapes do not fit together.
    #[error("{op}: {detail}")]
    Shape { op: &'static str, detail: String },

    /// An op got tensors that live on different devices.
    #[error("{op}: inputs live on different devices ({left} and {right})")]
    DeviceMismatch { op: &'static str, left: String, right: String },

    /// CUDA was asked for but cannot be used on this machine.
    #[error("CUDA is not available: {0}")]
    CudaUnavailable(String),

    /// A CUDA driver call failed; `context` says what the engine was doing.
    #[error("CUDA driver error while {context}: {source}")]
    Driver { context: String, source: cudarc::driver::DriverError },

    /// A cuBLAS call failed.
    #[error("cuBLAS error while {context}: {source}")]
    Blas { context: String, source: cudarc::cublas::result::CublasError },

    /// A kernel family failed to compile through NVRTC.
    #[error("NVRTC could not compile kernels/{family}.cu:\n{log}")]
    KernelCompile { family: &'static str, log: String },

    /// Weights on disk do not match what the model expects.
    #[error("weights: {0}")]
    Weights(String),

    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    /// A value the user supplied (config, argument, data) is invalid.
    #[error("{0}")]
    Invalid(String),

    /// Another error, with what the engine was doing when it happened (the file, the batch item,
    /// the flag). The source keeps its kind: [`Error::kind`] finds it under any number of layers.
    #[error("{context}: {source}")]
    Context { context: String, source: Box<Error> },
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn shape(op: &'static str, detail: impl Into<String>) -> Self {
        Error::Shape { op, detail: detail.into() }
    }

    pub fn driver(context: impl Into<String>) -> impl FnOnce(cudarc::driver::DriverError) -> Self {
        let context = context.into();
        move |source| Error::Driver { context, source }
    }

    pub fn blas(context: impl Into<String>) -> impl FnOnce(cudarc::cublas::result::CublasError) -> Self {
        let context = context.into();
        move |source| Error::Blas { context, source }
    }

    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Error::Io { path, source }
    }

    /// This error under `context` (a file name, `item 3`, `--layer`): shown as `context: error`,
    /// its kind kept.
    pub fn context(self, context: impl Into<String>) -> Self {
        Error::Context { context: context.into(), source: Box::new(self) }
    }

    /// For `map_err`: wraps an error in `context` ([`Error::context`]).
    pub fn within(context: impl Into<String>) -> impl FnOnce(Error) -> Self {
        let context = context.into();
        move |error| error.context(context)
    }

    /// The error under every [`Error::Context`] layer: what kind of failure it was.
    pub fn kind(&self) -> &Error {
        match self {
            Error::Context { source, .. } => source.kind(),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Error;

    #[test]
    fn context_keeps_the_kind_and_shows_every_layer() {
        let missing = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let error = Error::io("weights.safetensors")(missing).context("item 2").context("run.csv");
        assert_eq!(error.to_string(), "run.csv: item 2: weights.safetensors: no such file");
        assert!(matches!(error.kind(), Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound));
        let invalid = Error::Invalid("empty prompt".into());
        assert!(matches!(Error::within("item 0")(invalid).kind(), Error::Invalid(text) if text == "empty prompt"));
    }
}
