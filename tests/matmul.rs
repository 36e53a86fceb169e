//! Matmul family (src/ops/matmul/): batched and shared-b products under every transpose
//! combination, `linear` and `column_sums`, against naive f64 loops on every device, GPU against
//! CPU, and gradients against finite differences.

mod common;

use common::{assert_close, check_gradients, devices, gpu, random_tensor, random_vec};
use mcs_engine::ops::{column_sums, linear, linear_panels, matmul, matmul_with, MatmulOpts, PanelWeight};
use mcs_engine::{Device, Tape, Tensor};
use proptest::prelude::*;

/// Naive f64 product of stored operands: a batch of `[m, k]` matrices (stored `[k, m]` when
/// `ta`), b one `[k, n]` per batch or, when `shared_b`, a single one (stored `[n, k]` when `tb`).
#[allow(clippy::too_many_arguments)]
fn matmul_f64(
    a: &[f32],
    b: &[f32],
    batch: usize,
    m: usize,
    k: usize,
    n: usize,
    ta: bool,
    tb: bool,
    shared_b: bool,
    alpha: f32,
) -> Vec<f32> {
    let mut out = Vec::with_capacity(batch * m * n);
    for i in 0..batch {
        let a_mat = &a[i * m * k..];
        let b_mat = if shared_b { b } else { &b[i * k * n..] };
        for r in 0..m {
            for c in 0..n {
                let mut sum = 0.0f64;
                for p in 0..k {
                    let av = if ta { a_mat[p * m + r] } else { a_mat[r * k + p] };
                    let bv = if tb { b_mat[c * k + p] } else { b_mat[p * n + c] };
                    sum += av as f64 * bv as f64;
                }
                out.push((alpha as f64 * sum) as f32);
            }
        }
    }
    out
}

/// Stored shape of an operand: `[.., rows, cols]`, or `[.., cols, rows]` when transposed.
fn stored(batch_dims: &[usize], rows: usize, cols: usize, transposed: bool) -> Vec<usize> {
    let mut shape = batch_dims.to_vec();
    shape.extend(if transposed { [cols, rows] } else { [rows, cols] });
    shape
}

/// f32 products of K terms of magnitude <= 1 accumulate rounding of about K * 2^-24 relative to
/// the sum of |terms|; 1e-5 + 1e-5 relative covers K up to ~100 with room for the blocked
/// summation orders of gemm/cuBLAS. Longer sums scale the absolute part with sqrt(K).
fn product_atol(k: usize) -> f32 {
    1e-5 * ((k as f32).sqrt() / 4.0).max(1.0)
}

/// Runs one forward case on `device` and compares it with the f64 reference.
#[allow(clippy::too_many_arguments)]
fn check_forward(
    device: &Device,
    batch_dims: &[usize],
    m: usize,
    k: usize,
    n: usize,
    ta: bool,
    tb: bool,
    shared_b: bool,
    alpha: f32,
    seed: u64,
) {
    let batch: usize = batch_dims.iter().product();
    let a_shape = stored(batch_dims, m, k, ta);
    let b_shape = if shared_b { stored(&[], k, n, tb) } else { stored(batch_dims, k, n, tb) };
    let a = random_vec(seed, a_shape.iter().product(), -1.0, 1.0);
    let b = random_vec(seed + 1, b_shape.iter().product(), -1.0, 1.0);
    let want = matmul_f64(&a, &b, batch, m, k, n, ta, tb, shared_b, alpha);
    let at = Tensor::from_slice(&a, &a_shape, device).unwrap();
    let bt = Tensor::from_slice(&b, &b_shape, device).unwrap();
    let opts = MatmulOpts { transpose_a: ta, transpose_b: tb, alpha };
    let y = matmul_with(&Tape::inference(), &at, &bt, opts).unwrap();
    let mut want_shape = batch_dims.to_vec();
    want_shape.extend([m, n]);
    assert_eq!(y.shape(), want_shape.as_slice());
    let what = format!("matmul {a_shape:?} x {b_shape:?} ta={ta} tb={tb} alpha={alpha} on {}", device.name());
    assert_close(&what, &y.to_vec().unwrap(), &want, product_atol(k) * alpha.abs().max(1.0), 1e-5);
}

#[test]
fn matmul_matches_f64_for_every_transpose_and_odd_sizes() {
    for device in devices() {
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            for &(m, k, n) in &[(1, 1, 1), (7, 33, 65), (65, 7, 33), (33, 65, 1), (1, 65, 7)] {
                check_forward(&device, &[], m, k, n, ta, tb, false, 1.0, 1);
                check_forward(&device, &[3], m, k, n, ta, tb, false, 1.0, 2);
                check_forward(&device, &[2, 3], m, k, n, ta, tb, true, 0.5, 3);
            }
        }
    }
}

/// The CPU splits a product with few rows into one block of output columns per thread
/// (src/ops/matmul.rs, `gemm_threaded`); that must give the f64 result, and the same bits in a
/// pool of 1, 2 or 3 threads (3 leaves a ragged last block), whatever the transposes, with a
/// bias (linear), in linear's gradients and in a shared operand's gradient summed over the batch.
/// Shapes: 197 rows (one image's tokens) are split; 1030 rows are not (they check the crate's
/// own threading gives the same bits).
#[test]
fn cpu_products_are_bit_identical_across_thread_counts() {
    let run_in = |threads: usize, f: &(dyn Fn() -> Vec<Vec<f32>> + Sync)| {
        rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap().install(f)
    };
    let cpu = Device::Cpu;
    let products = || {
        let mut outs = Vec::new();
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            for &(m, k, n) in &[(197, 96, 700), (1030, 40, 300)] {
                let a = random_tensor(11, &stored(&[], m, k, ta), -1.0, 1.0, &cpu);
                let b = random_tensor(12, &stored(&[], k, n, tb), -1.0, 1.0, &cpu);
                let opts = MatmulOpts { transpose_a: ta, transpose_b: tb, alpha: 0.5 };
                let y = matmul_with(&Tape::inference(), &a, &b, opts).unwrap().to_vec().unwrap();
                let want = matmul_f64(&a.to_vec().unwrap(), &b.to_vec().unwrap(), 1, m, k, n, ta, tb, true, 0.5);
                assert_close(&format!("{m}x{k}x{n} ta={ta} tb={tb}"), &y, &want, product_atol(k), 1e-5);
                outs.push(y);
            }
        }
        // linear (bias rows read as C's start) and its gradients: all three products have under
        // 1024 rows and at least 256 columns, so all are split.
        let tape = Tape::new();
        let x = random_tensor(13, &[2, 197, 300], -1.0, 1.0, &cpu).into_trainable();
        let w = random_tensor(14, &[520, 300], -1.0, 1.0, &cpu).into_trainable();
        let bias = random_tensor(15, &[520], -1.0, 1.0, &cpu).into_trainable();
        let y = linear(&tape, &x, &w, Some(&bias)).unwrap();
        let grads = tape.backward_from(&y, random_tensor(16, &[2, 197, 520], -1.0, 1.0, &cpu)).unwrap();
        outs.push(y.to_vec().unwrap());
        outs.push(grads.get(&w).unwrap().to_vec().unwrap());
        outs.push(grads.get(&x).unwrap().to_vec().unwrap());
        // A transposed batched operand against a shared one: the shared one's gradient is one
        // [300, 300] product accumulated over the two batches.
        let tape = Tape::new();
        let a = random_tensor(17, &[2, 300, 197], -1.0, 1.0, &cpu).into_trainable();
        let b = random_tensor(18, &[300, 300], -1.0, 1.0, &cpu).into_trainable();
        let opts = MatmulOpts { transpose_a: true, ..MatmulOpts::default() };
        let y = matmul_with(&tape, &a, &b, opts).unwrap();
        let grads = tape.backward_from(&y, random_tensor(19, &[2, 197, 300], -1.0, 1.0, &cpu)).unwrap();
        outs.push(grads.get(&b).unwrap().to_vec().unwrap());
        outs
    };
    let one = run_in(1, &products);
    for threads in [2, 3] {
        let many = run_in(threads, &products);
        for (i, (a, b)) in one.iter().zip(&many).enumerate() {
            assert!(a == b, "product {i} differs between 1 and {threads} threads");
        }
    }
}

/// A row of a product is the same bits whatever the number of rows around it: the first rows of a
/// taller A give the product of those rows alone (an image's maps must not depend on the batch it
/// is in, docs/model.md §5). The shapes cover the `gemm` crate's shape-chosen paths that a plain
/// call would take: one row (matrix-vector), at most 16 x 16 outputs (dot-product kernels), within
/// 64 x 64 with k > 512 (other k-blocks), one column, and the general path; under every transpose.
#[test]
fn a_row_of_a_product_does_not_depend_on_the_number_of_rows() {
    for device in devices() {
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            for &(k, n) in &[(48, 24), (600, 40), (64, 1), (30, 7), (96, 300)] {
                let tall = 70;
                let a = random_vec(21, tall * k, -1.0, 1.0);
                let b = random_tensor(22, &stored(&[], k, n, tb), -1.0, 1.0, &device);
                let opts = MatmulOpts { transpose_a: ta, transpose_b: tb, alpha: 1.0 };
                let product = |rows: usize| {
                    // The first `rows` rows of op(A), stored as the transpose flag says.
                    let stored_a: Vec<f32> = if ta {
                        (0..k).flat_map(|c| (0..rows).map(move |r| (r, c))).map(|(r, c)| a[r * k + c]).collect()
                    } else {
                        a[..rows * k].to_vec()
                    };
                    let a = Tensor::from_slice(&stored_a, &stored(&[], rows, k, ta), &device).unwrap();
                    matmul_with(&Tape::inference(), &a, &b, opts).unwrap().to_vec().unwrap()
                };
                let full = product(tall);
                for rows in [1, 2, 5, 16, 64, 65] {
                    assert!(
                        product(rows)[..] == full[..rows * n],
                        "{}: {rows} rows of a {tall}x{k}x{n} product (ta={ta}, tb={tb}) differ from the taller product's",
                        device.name()
                    );
                }
            }
        }
    }
}

#[test]
fn matmul_handles_empty_inner_dimension() {
    for device in devices() {
        let a = Tensor::zeros(&[2, 3, 0], &device).unwrap();
        let b = Tensor::zeros(&[2, 0, 4], &device).unwrap();
        let y = matmul(&Tape::inference(), &a, &b).unwrap();
        assert_eq!(y.shape(), &[2, 3, 4]);
        assert_eq!(y.to_vec().unwrap(), vec![0.0; 24], "an empty sum is zero on {}", device.name());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn matmul_matches_f64_over_shapes(
        batch in 1usize..4, m in 1usize..70, k in 1usize..70, n in 1usize..70,
        ta in any::<bool>(), tb in any::<bool>(), shared_b in any::<bool>(), seed in any::<u64>(),
    ) {
        for device in devices() {
            check_forward(&device, &[batch], m, k, n, ta, tb, shared_b, 1.0, seed);
        }
    }

    #[test]
    fn linear_matches_f64_over_shapes(rows in 1usize..40, inputs in 1usize..70, outputs in 1usize..70, with_bias in any::<bool>(), seed in any::<u64>()) {
        let x = random_vec(seed, rows * inputs, -1.0, 1.0);
        let w = random_vec(seed ^ 1, outputs * inputs, -1.0, 1.0);
        let bias = random_vec(seed ^ 2, outputs, -1.0, 1.0);
        let mut want = matmul_f64(&x, &w, 1, rows, inputs, outputs, false, true, false, 1.0);
        if with_bias {
            want.iter_mut().enumerate().for_each(|(i, v)| *v += bias[i % outputs]);
        }
        for device in devices() {
            // x as [2, rows/2..] would need even rows: use [1, rows, in] to exercise leading dims.
            let xt = Tensor::from_slice(&x, &[1, rows, inputs], &device).unwrap();
            let wt = Tensor::from_slice(&w, &[outputs, inputs], &device).unwrap();
            let bt = Tensor::from_slice(&bias, &[outputs], &device).unwrap();
            let y = linear(&Tape::inference(), &xt, &wt, with_bias.then_some(&bt)).unwrap();
            prop_assert_eq!(y.shape(), &[1, rows, outputs]);
            assert_close(&format!("linear on {}", device.name()), &y.to_vec().unwrap(), &want, product_atol(inputs), 1e-5);
        }
    }
}

#[test]
fn column_sums_match_f64() {
    let x = random_vec(5, 37 * 65, -1.0, 1.0);
    let want: Vec<f32> = (0..65).map(|c| (0..37).map(|r| x[r * 65 + c] as f64).sum::<f64>() as f32).collect();
    for device in devices() {
        let xt = Tensor::from_slice(&x, &[37, 65], &device).unwrap();
        // 37 terms of magnitude <= 1.
        assert_close(
            &format!("column_sums on {}", device.name()),
            &column_sums(&xt).unwrap().to_vec().unwrap(),
            &want,
            1e-5,
            1e-5,
        );
    }
}

// Finite differences in f32 with eps 1e-2: for a product (bilinear in each operand) the central
// difference has no truncation error, leaving f32 rounding of the probe (~1e-7 * |L| / eps with
// |L| ~ 10) ~ 1e-4; 1e-3 absolute + 1e-3 relative sits well above it.
const GRAD_EPS: f32 = 1e-2;
const GRAD_ATOL: f32 = 1e-3;
const GRAD_RTOL: f32 = 1e-3;

#[test]
fn matmul_gradients_match_finite_differences() {
    let (m, k, n) = (3, 4, 5);
    for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
        for shared_b in [false, true] {
            let a_shape = stored(&[2], m, k, ta);
            let b_shape = if shared_b { stored(&[], k, n, tb) } else { stored(&[2], k, n, tb) };
            let inputs = [
                (random_vec(11, a_shape.iter().product(), -1.0, 1.0), a_shape),
                (random_vec(12, b_shape.iter().product(), -1.0, 1.0), b_shape),
            ];
            let opts = MatmulOpts { transpose_a: ta, transpose_b: tb, alpha: 0.7 };
            let name = format!("matmul ta={ta} tb={tb} shared_b={shared_b}");
            check_gradients(&name, &inputs, &[], GRAD_EPS, GRAD_ATOL, GRAD_RTOL, |tape, p| {
                matmul_with(tape, &p[0], &p[1], opts)
            });
        }
    }
}

#[test]
fn matmul_gradient_of_a_frozen_operand_is_not_computed() {
    let inputs =
        [(random_vec(13, 2 * 3 * 4, -1.0, 1.0), vec![2, 3, 4]), (random_vec(14, 4 * 5, -1.0, 1.0), vec![4, 5])];
    check_gradients("matmul frozen b", &inputs, &[1], GRAD_EPS, GRAD_ATOL, GRAD_RTOL, |tape, p| {
        matmul(tape, &p[0], &p[1])
    });
    check_gradients("matmul frozen a", &inputs, &[0], GRAD_EPS, GRAD_ATOL, GRAD_RTOL, |tape, p| {
        matmul(tape, &p[0], &p[1])
    });
}

#[test]
fn linear_gradients_match_finite_differences() {
    let inputs = [
        (random_vec(21, 2 * 3 * 4, -1.0, 1.0), vec![2, 3, 4]),
        (random_vec(22, 5 * 4, -1.0, 1.0), vec![5, 4]),
        (random_vec(23, 5, -1.0, 1.0), vec![5]),
    ];
    check_gradients("linear", &inputs, &[], GRAD_EPS, GRAD_ATOL, GRAD_RTOL, |tape, p| {
        linear(tape, &p[0], &p[1], Some(&p[2]))
    });
    check_gradients("linear frozen weight", &inputs, &[1], GRAD_EPS, GRAD_ATOL, GRAD_RTOL, |tape, p| {
        linear(tape, &p[0], &p[1], Some(&p[2]))
    });
    check_gradients("linear frozen input", &inputs, &[0], GRAD_EPS, GRAD_ATOL, GRAD_RTOL, |tape, p| {
        linear(tape, &p[0], &p[1], Some(&p[2]))
    });
    check_gradients("linear without bias", &inputs[..2], &[], GRAD_EPS, GRAD_ATOL, GRAD_RTOL, |tape, p| {
        linear(tape, &p[0], &p[1], None)
    });
}

/// Forward output and gradients of `f(a, b)` on `device` for a fixed output gradient.
fn forward_and_grads(
    device: &Device,
    a: &Tensor,
    b: &Tensor,
    bias: Option<&Tensor>,
    f: impl Fn(&Tape, &Tensor, &Tensor, Option<&Tensor>) -> Tensor,
) -> Vec<Vec<f32>> {
    let tape = Tape::new();
    let a = a.to_device(device).unwrap().into_trainable();
    let b = b.to_device(device).unwrap().into_trainable();
    let bias = bias.map(|t| t.to_device(device).unwrap().into_trainable());
    let y = f(&tape, &a, &b, bias.as_ref());
    let dy = random_tensor(99, y.shape(), -1.0, 1.0, device);
    let grads = tape.backward_from(&y, dy).unwrap();
    let mut out =
        vec![y.to_vec().unwrap(), grads.get(&a).unwrap().to_vec().unwrap(), grads.get(&b).unwrap().to_vec().unwrap()];
    out.extend(bias.map(|t| grads.get(&t).unwrap().to_vec().unwrap()));
    out
}

#[test]
fn gpu_matches_cpu_forward_and_backward() {
    let Some(gpu) = gpu() else { return };
    for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
        for shared_b in [false, true] {
            let (m, k, n) = (33, 65, 7);
            let a = random_tensor(31, &stored(&[2, 3], m, k, ta), -1.0, 1.0, &Device::Cpu);
            let b_shape = if shared_b { stored(&[], k, n, tb) } else { stored(&[2, 3], k, n, tb) };
            let b = random_tensor(32, &b_shape, -1.0, 1.0, &Device::Cpu);
            let opts = MatmulOpts { transpose_a: ta, transpose_b: tb, alpha: 1.5 };
            let run = |d: &Device| forward_and_grads(d, &a, &b, None, |t, a, b, _| matmul_with(t, a, b, opts).unwrap());
            let (on_gpu, on_cpu) = (run(&gpu), run(&Device::Cpu));
            for (what, g, c) in
                [("output", &on_gpu[0], &on_cpu[0]), ("da", &on_gpu[1], &on_cpu[1]), ("db", &on_gpu[2], &on_cpu[2])]
            {
                // Both are f32 GEMMs over at most 6*33 = 198 terms in different orders.
                assert_close(
                    &format!("matmul {what} ta={ta} tb={tb} shared_b={shared_b} gpu vs cpu"),
                    g,
                    c,
                    1e-4,
                    1e-4,
                );
            }
        }
    }
    let x = random_tensor(41, &[4, 9, 65], -1.0, 1.0, &Device::Cpu);
    let w = random_tensor(42, &[33, 65], -1.0, 1.0, &Device::Cpu);
    let bias = random_tensor(43, &[33], -1.0, 1.0, &Device::Cpu);
    let run = |d: &Device| forward_and_grads(d, &x, &w, Some(&bias), |t, x, w, b| linear(t, x, w, b).unwrap());
    let (on_gpu, on_cpu) = (run(&gpu), run(&Device::Cpu));
    for (i, what) in ["output", "dx", "dweight", "dbias"].iter().enumerate() {
        // f32 GEMMs over at most 36 (rows) or 65 (in) terms, summed in different orders.
        assert_close(&format!("linear {what} gpu vs cpu"), &on_gpu[i], &on_cpu[i], 1e-4, 1e-4);
    }
}

/// TF32 keeps 10 mantissa bits, so it rounds 1 + j * 2^-12 (j = 1..3) to 1; FP32 keeps them.
/// With b in {0.5, 1}, every product and every partial sum (< 512, multiples of 2^-13) is exact
/// in FP32 whatever the summation order, so strict FP32 must match exactly, while TF32 (or any
/// reduced-precision mode) would be off by about 0.1.
#[test]
fn gpu_gemm_is_strict_fp32() {
    let Some(gpu) = gpu() else { return };
    let (m, k, n) = (64, 256, 64);
    let a: Vec<f32> = (0..m * k).map(|i| 1.0 + (1 + i % 3) as f32 * 2f32.powi(-12)).collect();
    let b: Vec<f32> = (0..k * n).map(|i| if i % 5 == 0 { 0.5 } else { 1.0 }).collect();
    let want = matmul_f64(&a, &b, 1, m, k, n, false, false, false, 1.0);
    let y = matmul(
        &Tape::inference(),
        &Tensor::from_slice(&a, &[m, k], &gpu).unwrap(),
        &Tensor::from_slice(&b, &[k, n], &gpu).unwrap(),
    )
    .unwrap();
    assert_close("strict FP32 cuBLAS vs exact", &y.to_vec().unwrap(), &want, 0.0, 0.0);
    // The same data must be exact on the CPU too (the test would otherwise prove nothing).
    let y_cpu =
        matmul(&Tape::inference(), &Tensor::from_vec(a, &[m, k]).unwrap(), &Tensor::from_vec(b, &[k, n]).unwrap())
            .unwrap();
    assert_close("FP32 CPU vs exact", &y_cpu.to_vec().unwrap(), &want, 0.0, 0.0);
}

#[test]
fn bad_shapes_are_errors_naming_the_shapes() {
    let t = |shape: &[usize]| Tensor::zeros(shape, &Device::Cpu).unwrap();
    let tape = Tape::inference();
    let message = |r: mcs_engine::Result<Tensor>| r.unwrap_err().to_string();

    let err = message(matmul(&tape, &t(&[2, 3, 4]), &t(&[2, 5, 6])));
    assert!(err.contains("[2, 3, 4]") && err.contains("[2, 5, 6]") && err.contains("inner"), "{err}");
    let err = message(matmul(&tape, &t(&[2, 3, 4]), &t(&[3, 4, 6])));
    assert!(err.contains("batch") && err.contains("[3, 4, 6]"), "{err}");
    let err = message(matmul(&tape, &t(&[4]), &t(&[4, 2])));
    assert!(err.contains("rank") && err.contains("[4]"), "{err}");
    let err =
        message(matmul_with(&tape, &t(&[3, 4]), &t(&[3, 5]), MatmulOpts { transpose_b: true, ..Default::default() }));
    assert!(err.contains("[3, 5] (transposed)"), "{err}");
    let err = message(linear(&tape, &t(&[2, 3]), &t(&[5, 4]), None));
    assert!(err.contains("[2, 3]") && err.contains("[5, 4]"), "{err}");
    let err = message(linear(&tape, &t(&[2, 4]), &t(&[5, 4]), Some(&t(&[4]))));
    assert!(err.contains("bias [4]") && err.contains("[5, 4]"), "{err}");
}

/// An empty inner dimension: the product is all zeros (or the bias rows), on every device, and
/// its gradients are zeros / empty tensors of the operands' shapes.
#[test]
fn empty_inner_dimension_gives_zeros_or_bias_rows() {
    for device in devices() {
        let name = device.name();
        let a = Tensor::from_slice(&[], &[2, 3, 0], &device).unwrap();
        let b = Tensor::from_slice(&[], &[2, 0, 4], &device).unwrap();
        let y = matmul(&Tape::inference(), &a, &b).unwrap();
        assert_eq!(y.shape(), [2, 3, 4]);
        // Exact: no arithmetic happens.
        assert_close(&format!("k = 0 matmul on {name}"), &y.to_vec().unwrap(), &[0.0; 24], 0.0, 0.0);

        let x = Tensor::from_slice(&[], &[5, 0], &device).unwrap();
        let weight = Tensor::from_slice(&[], &[3, 0], &device).unwrap();
        let bias = Tensor::from_slice(&[1.5, -2.0, 0.25], &[3], &device).unwrap().into_trainable();
        let tape = Tape::new();
        let y = linear(&tape, &x, &weight, Some(&bias)).unwrap();
        let want: Vec<f32> = [1.5, -2.0, 0.25].repeat(5);
        assert_close(&format!("k = 0 linear on {name}"), &y.to_vec().unwrap(), &want, 0.0, 0.0);
        let dy = Tensor::from_slice(&random_vec(9, 15, -1.0, 1.0), &[5, 3], &device).unwrap();
        let grads = tape.backward_from(&y, dy.clone()).unwrap();
        let dy_host = dy.to_vec().unwrap();
        let want_db: Vec<f32> = (0..3).map(|c| (0..5).map(|r| dy_host[r * 3 + c] as f64).sum::<f64>() as f32).collect();
        // 5 terms of magnitude <= 1 summed in f32.
        assert_close(
            &format!("k = 0 bias gradient on {name}"),
            &grads.get(&bias).unwrap().to_vec().unwrap(),
            &want_db,
            1e-6,
            1e-6,
        );
    }
}

#[test]
fn empty_inner_dimension_gradients_have_the_operands_shapes() {
    let a = Tensor::from_vec(vec![], &[3, 0]).unwrap().into_trainable();
    let b = Tensor::from_vec(vec![], &[0, 2]).unwrap().into_trainable();
    let tape = Tape::new();
    let y = matmul(&tape, &a, &b).unwrap();
    let grads = tape.backward_from(&y, Tensor::ones(&[3, 2], &Device::Cpu).unwrap()).unwrap();
    assert_eq!(grads.get(&a).unwrap().shape(), [3, 0]);
    assert_eq!(grads.get(&b).unwrap().shape(), [0, 2]);
}

/// column_sums sums in a fixed lane order on both backends, so the GPU result is bit-identical.
#[test]
fn column_sums_gpu_is_bit_identical_to_cpu() {
    let Some(gpu) = gpu() else { return };
    for (rows, cols) in [(1, 1), (7, 33), (197, 768), (3000, 5)] {
        let x = random_vec(rows as u64, rows * cols, -1.0, 1.0);
        let cpu = column_sums(&Tensor::from_vec(x.clone(), &[rows, cols]).unwrap()).unwrap().to_vec().unwrap();
        let on_gpu = column_sums(&Tensor::from_slice(&x, &[rows, cols], &gpu).unwrap()).unwrap().to_vec().unwrap();
        // Exact: same additions in the same order, and no multiplications to contract.
        assert_close(&format!("column_sums [{rows}, {cols}] GPU vs CPU"), &on_gpu, &cpu, 0.0, 0.0);
    }
}

/// A frozen weight stored in panels (`ops::PanelWeight`, what an inference model keeps) gives
/// `linear`'s outputs bit for bit: with and without a bias, outputs that fill their last panel or
/// not, few rows (padded as `linear` pads them) and many (several row blocks), on 1, 2 and 3
/// threads; and a row's outputs do not depend on how many rows come with it. Its backward gives
/// x's and the bias's gradients as `linear` does.
#[test]
fn a_weight_in_panels_gives_linears_outputs_bit_for_bit() {
    let cpu = Device::Cpu;
    let run_in = |threads: usize, f: &(dyn Fn() + Sync)| {
        rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap().install(f)
    };
    for &(outputs, inputs) in &[(64, 48), (200, 96), (7, 300)] {
        let w = random_tensor(31, &[outputs, inputs], -1.0, 1.0, &cpu);
        let bias = random_tensor(32, &[outputs], -1.0, 1.0, &cpu);
        let panels = PanelWeight::pack(&w).unwrap().expect("a CPU weight goes into panels");
        assert_eq!(panels.tensor().shape(), [outputs.div_ceil(64), inputs, 64]);
        assert!(panels.unpack().unwrap().to_vec().unwrap() == w.to_vec().unwrap(), "unpack is the weight again");
        let tallest = 600;
        let x_all = random_vec(33, tallest * inputs, -1.0, 1.0);
        for with_bias in [false, true] {
            let b = with_bias.then_some(&bias);
            let full_rows = |rows: usize| {
                let x = Tensor::from_slice(&x_all[..rows * inputs], &[rows, inputs], &cpu).unwrap();
                let plain = linear(&Tape::inference(), &x, &w, b).unwrap().to_vec().unwrap();
                let from_panels = linear_panels(&Tape::inference(), &x, &panels, b).unwrap().to_vec().unwrap();
                assert!(
                    plain == from_panels,
                    "{rows} rows of [{outputs}, {inputs}] (bias {with_bias}): panels differ from linear"
                );
                from_panels
            };
            for threads in [1, 2, 3] {
                run_in(threads, &|| {
                    let tall = full_rows(tallest);
                    for rows in [1, 5, 64, 65, 197, 300] {
                        assert!(
                            full_rows(rows)[..] == tall[..rows * outputs],
                            "{rows} rows differ from the first rows of {tallest}"
                        );
                    }
                });
            }
        }
        // The backward through the panels.
        let tape = Tape::new();
        let x = random_tensor(34, &[3, 70, inputs], -1.0, 1.0, &cpu).into_trainable();
        let trainable_bias = bias.clone().into_trainable();
        let y = linear_panels(&tape, &x, &panels, Some(&trainable_bias)).unwrap();
        let dy = random_tensor(35, &[3, 70, outputs], -1.0, 1.0, &cpu);
        let grads = tape.backward_from(&y, dy.clone()).unwrap();
        let tape = Tape::new();
        let y_plain = linear(&tape, &x, &w, Some(&trainable_bias)).unwrap();
        let want = tape.backward_from(&y_plain, dy).unwrap();
        assert!(y.to_vec().unwrap() == y_plain.to_vec().unwrap());
        for t in [&x, &trainable_bias] {
            assert!(
                grads.get(t).unwrap().to_vec().unwrap() == want.get(t).unwrap().to_vec().unwrap(),
                "gradients differ"
            );
        }
    }
    // A trainable weight is refused (its updates would not reach the panels), with a sentence.
    let trainable = random_tensor(36, &[8, 4], -1.0, 1.0, &cpu).into_trainable();
    let err = PanelWeight::pack(&trainable).err().expect("a trainable weight is refused").to_string();
    assert!(err.contains("trainable"), "{err}");
}
