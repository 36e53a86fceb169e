//! Running the `mcs-engine` binary from a test: which binary, and what a run gave back.
#![allow(dead_code)] // each test binary uses its own part of these helpers

use std::path::{Path, PathBuf};
use std::process::Command;

/// The binary under test: `MCS_ENGINE_BIN` when set (a packed GPU kit, where cargo's compile-time
/// path does not exist), else the one cargo built.
pub fn binary() -> PathBuf {
    std::env::var_os("MCS_ENGINE_BIN").map_or_else(|| env!("CARGO_BIN_EXE_mcs-engine").into(), Into::into)
}

/// A finished run: its exit code (`None` when a signal ended it) and its output as text.
pub struct Outcome {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Runs the binary with `args` and waits for it.
pub fn run(args: &[&str]) -> Outcome {
    let out = Command::new(binary()).args(args).output().unwrap();
    Outcome {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into(),
        stderr: String::from_utf8_lossy(&out.stderr).into(),
    }
}

/// A path as a command-line argument.
pub fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}
