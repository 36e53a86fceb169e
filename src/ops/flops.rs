//! A running count of the useful floating-point work of matrix products (what `mcs-engine bench`
//! reports as a step's FLOPs and compares with the machine's measured SGEMM peak).
//!
//! Counted: two operations per multiply-add of every matrix product an op asks for (`matmul`,
//! `linear` and their backward products, the convolutions' GEMMs, the probabilistic attention's
//! score and value products), at the op's logical shape, on any device: padding a backend adds
//! and the element-wise work around the products (softmax, norms, activations) are not counted.
//! Those are memory-bound and a small share of the arithmetic, so the count is the figure to hold
//! against a GEMM peak.

use std::sync::atomic::{AtomicU64, Ordering};

static MATRIX_FLOPS: AtomicU64 = AtomicU64::new(0);

/// Adds `batch` products of `[m, k] x [k, n]`.
pub(crate) fn count_matrix_product(batch: usize, m: usize, k: usize, n: usize) {
    let flops = 2 * (batch as u64) * (m as u64) * (k as u64) * (n as u64);
    MATRIX_FLOPS.fetch_add(flops, Ordering::Relaxed);
}

/// Matrix-product FLOPs counted since the process started (differences of two readings give a
/// step's work).
pub fn matrix_flops() -> u64 {
    MATRIX_FLOPS.load(Ordering::Relaxed)
}
