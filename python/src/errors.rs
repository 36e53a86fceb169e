//! Engine errors as Python exceptions (docs/python.md §5). The exception classes live in
//! `mcs_engine/_errors.py`, so that each can derive from both `McsEngineError` and the built-in
//! exception a Python user expects (`ValueError`, `FileNotFoundError`, `OSError`).

use std::any::Any;
use std::path::Path;

use mcs_engine::model::folder::{CONFIG_FILE, MODEL_FILE, TOKENIZER_FILE};
use mcs_engine::Error;
use pyo3::prelude::*;
use pyo3::types::PyType;

/// What went wrong inside a call: an engine error, or an internal error (a panic caught before
/// it could cross into Python, or results that do not fit together: a bug, reported as one).
pub enum Failure {
    Engine(Error),
    Internal(String),
}

impl From<Error> for Failure {
    fn from(error: Error) -> Failure {
        Failure::Engine(error)
    }
}

/// Runs `work`, catching a panic so that it becomes an exception rather than unwinding into the
/// interpreter.
pub fn guarded<T>(work: impl FnOnce() -> mcs_engine::Result<T>) -> Result<T, Failure> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)) {
        Ok(result) => result.map_err(Failure::Engine),
        Err(payload) => Err(Failure::Internal(panic_message(payload.as_ref()))),
    }
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    match (payload.downcast_ref::<&str>(), payload.downcast_ref::<String>()) {
        (Some(text), _) => (*text).to_string(),
        (_, Some(text)) => text.clone(),
        _ => "a panic without a message".to_string(),
    }
}

/// The exception of a failure: `InvalidInputError` (a `ValueError`) for bad input, options,
/// configs or weights; `MissingFileError` (a `FileNotFoundError`) and `FileError` (an `OSError`)
/// for files, with `errno` and `filename` set; `McsEngineError` itself for device failures and
/// internal errors. The message is the engine's own.
pub fn to_py(py: Python<'_>, failure: Failure) -> PyErr {
    match failure {
        Failure::Engine(error) => engine_error(py, &error),
        Failure::Internal(message) => {
            raise(py, "McsEngineError", format!("internal error in mcs-engine (please report it): {message}"), None)
        }
    }
}

fn engine_error(py: Python<'_>, error: &Error) -> PyErr {
    // The message keeps every layer of context; the class follows the error under them.
    let message = error.to_string();
    match error.kind() {
        Error::Invalid(_) | Error::Weights(_) | Error::Shape { .. } => raise(py, "InvalidInputError", message, None),
        Error::Io { path, source } => {
            let class = match source.kind() {
                std::io::ErrorKind::NotFound => "MissingFileError",
                _ => "FileError",
            };
            raise(py, class, message, Some((source.raw_os_error(), path)))
        }
        _ => raise(py, "McsEngineError", message, None),
    }
}

/// A failure to load a model folder. The engine reports a missing folder or a missing file in
/// it as invalid input; to a Python user that is a `FileNotFoundError` naming the missing path.
pub fn load_error(py: Python<'_>, failure: Failure, dir: &Path) -> PyErr {
    if let Failure::Engine(error) = &failure {
        if matches!(error.kind(), Error::Invalid(_)) {
            let missing = std::iter::once(dir.to_path_buf())
                .chain([CONFIG_FILE, TOKENIZER_FILE, MODEL_FILE].map(|name| dir.join(name)))
                .find(|path| !path.exists());
            if let Some(path) = missing {
                return raise(py, "MissingFileError", error.to_string(), Some((Some(2), &path)));
            }
        }
    }
    to_py(py, failure)
}

/// An instance of `mcs_engine._errors.<class>` carrying `message`; for the `OSError` classes
/// also `errno` and `filename`. Should the class itself be unreachable, that error is raised.
fn raise(py: Python<'_>, class: &str, message: String, file: Option<(Option<i32>, &Path)>) -> PyErr {
    let build = || -> PyResult<PyErr> {
        let class = py.import("mcs_engine._errors")?.getattr(class)?.cast_into::<PyType>()?;
        let exception = class.call1((message,))?;
        if let Some((errno, path)) = file {
            exception.setattr("errno", errno)?;
            exception.setattr("filename", path.to_string_lossy().into_owned())?;
        }
        Ok(PyErr::from_value(exception))
    };
    build().unwrap_or_else(|e| e)
}
