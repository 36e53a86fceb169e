//! Reduce family (kernels/reduce.cu, src/ops/reduce.rs): sums, means and L2 normalisation against
//! independent f64 computations, gradients against finite differences, GPU against CPU, and
//! shape errors.

mod common;

use common::{assert_close, check_gradients, devices, gpu, random_tensor, random_vec};
use mcs_engine::ops::{
    l2_normalize_backward, l2_normalize_forward, l2_normalize_last, mean_all, mean_last, sum_all, sum_last,
    sum_last_backward,
};
use mcs_engine::{Device, Result, Tape, Tensor};
use proptest::prelude::*;

/// f64 sum of each row of `cols` values.
fn row_sums_f64(x: &[f32], cols: usize) -> Vec<f64> {
    x.chunks(cols).map(|r| r.iter().map(|&v| v as f64).sum()).collect()
}

/// The bound on an f32 summation's error used below: 16 roundings (a tree of depth <= 11 above a
/// few sequential adds per thread) of size 2^-24 relative to the sum of magnitudes.
fn f32_sum_tolerance(values: &[f32]) -> f32 {
    16.0 * f32::EPSILON / 2.0 * values.iter().map(|v| v.abs()).sum::<f32>()
}

/// The differentiable ops of this file, by name.
type Op = fn(&Tape, &Tensor) -> Result<Tensor>;
const OPS: [(&str, Op); 5] = [
    ("sum_last", sum_last),
    ("mean_last", mean_last),
    ("sum_all", sum_all),
    ("mean_all", mean_all),
    ("l2_normalize_last", l2_normalize_last),
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn row_sums_and_means_match_f64_reference(lead in 1usize..4, rows in 1usize..20, cols in 1usize..1100, seed in any::<u64>()) {
        let shape = [lead, rows, cols];
        let x = random_vec(seed, lead * rows * cols, -10.0, 10.0);
        let sums = row_sums_f64(&x, cols);
        let worst_row = x.chunks(cols).map(f32_sum_tolerance).fold(0.0f32, f32::max);
        for device in devices() {
            let xt = Tensor::from_slice(&x, &shape, &device).unwrap();
            let s = sum_last(&Tape::inference(), &xt).unwrap();
            let m = mean_last(&Tape::inference(), &xt).unwrap();
            prop_assert_eq!(s.shape(), &[lead, rows]);
            prop_assert_eq!(m.shape(), &[lead, rows]);
            let want_s: Vec<f32> = sums.iter().map(|&v| v as f32).collect();
            let want_m: Vec<f32> = sums.iter().map(|&v| (v / cols as f64) as f32).collect();
            assert_close(&format!("sum_last on {}", device.name()), &s.to_vec().unwrap(), &want_s, worst_row, 0.0);
            assert_close(&format!("mean_last on {}", device.name()), &m.to_vec().unwrap(), &want_m, worst_row / cols as f32, 1e-6);
        }
    }

    #[test]
    fn whole_tensor_sum_and_mean_match_f64_reference(n in 1usize..3000, seed in any::<u64>()) {
        let x = random_vec(seed, n, -10.0, 10.0);
        let want = row_sums_f64(&x, n)[0];
        for device in devices() {
            let xt = Tensor::from_slice(&x, &[n], &device).unwrap();
            let s = sum_all(&Tape::inference(), &xt).unwrap();
            let m = mean_all(&Tape::inference(), &xt).unwrap();
            prop_assert_eq!(s.shape(), &[] as &[usize]);
            assert_close(&format!("sum_all on {}", device.name()), &s.to_vec().unwrap(), &[want as f32], f32_sum_tolerance(&x), 0.0);
            assert_close(&format!("mean_all on {}", device.name()), &m.to_vec().unwrap(), &[(want / n as f64) as f32], f32_sum_tolerance(&x) / n as f32, 1e-6);
        }
    }

    #[test]
    fn l2_normalize_matches_f64_reference(rows in 1usize..30, cols in 1usize..600, scale in prop_oneof![Just(1e-3f32), Just(1.0f32), Just(1e3f32)], seed in any::<u64>()) {
        let x: Vec<f32> = random_vec(seed, rows * cols, -1.0, 1.0).iter().map(|v| v * scale).collect();
        let want: Vec<f32> = x
            .chunks(cols)
            .flat_map(|r| {
                let norm = r.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
                r.iter().map(move |&v| (v as f64 / norm) as f32)
            })
            .collect();
        for device in devices() {
            let xt = Tensor::from_slice(&x, &[rows, cols], &device).unwrap();
            let y = l2_normalize_last(&Tape::inference(), &xt).unwrap();
            // Outputs lie in [-1, 1]; the norm's f32 sum of squares is accurate to ~1e-6
            // relative, its square root halves that.
            assert_close(&format!("l2_normalize on {}", device.name()), &y.to_vec().unwrap(), &want, 1e-6, 1e-6);
        }
    }
}

#[test]
fn whole_tensor_sum_spans_many_blocks_and_is_deterministic() {
    // Beyond 1024 blocks of 256 threads, so the GPU's grid-stride loop and both passes are used.
    let n = 1_000_003;
    let x = random_vec(21, n, -1.0, 1.0);
    let want = row_sums_f64(&x, n)[0];
    for device in devices() {
        let xt = Tensor::from_slice(&x, &[n], &device).unwrap();
        let first = sum_all(&Tape::inference(), &xt).unwrap().to_scalar().unwrap();
        let second = sum_all(&Tape::inference(), &xt).unwrap().to_scalar().unwrap();
        assert_close(
            &format!("sum_all of {n} on {}", device.name()),
            &[first],
            &[want as f32],
            f32_sum_tolerance(&x),
            0.0,
        );
        assert_eq!(first.to_bits(), second.to_bits(), "sum_all on {} is not deterministic", device.name());
    }
}

#[test]
fn empty_and_degenerate_inputs() {
    for device in devices() {
        let empty = Tensor::zeros(&[0, 4], &device).unwrap();
        assert_eq!(sum_all(&Tape::inference(), &empty).unwrap().to_vec().unwrap(), vec![0.0]);
        assert_eq!(sum_last(&Tape::inference(), &empty).unwrap().shape(), &[0]);
        let err = mean_all(&Tape::inference(), &empty).unwrap_err().to_string();
        assert!(err.contains("[0, 4]"), "unexpected message: {err}");
        // A scalar sums to itself; an all-zero row normalises to NaN, as x / x.norm() does.
        let scalar = Tensor::from_slice(&[2.5], &[], &device).unwrap();
        assert_eq!(sum_all(&Tape::inference(), &scalar).unwrap().to_vec().unwrap(), vec![2.5]);
        let zero_row = Tensor::from_slice(&[0.0, 0.0, 3.0, 4.0], &[2, 2], &device).unwrap();
        let y = l2_normalize_last(&Tape::inference(), &zero_row).unwrap().to_vec().unwrap();
        assert!(y[0].is_nan() && y[1].is_nan(), "zero row on {}: {y:?}", device.name());
        assert_eq!(&y[2..], &[0.6, 0.8], "on {}", device.name());
    }
}

// Finite differences in f32 with step 1e-2: sums and means are linear (only rounding,
// ~1e-7 * |L| / step ~ 1e-4); L2 normalisation of rows with norms >= ~1 has bounded third
// derivatives, truncation ~1e-4. 2e-3 absolute + 1e-2 relative sits well above both.
#[test]
fn gradients_match_finite_differences() {
    for (name, op) in OPS {
        for shape in [vec![3, 5], vec![2, 3, 4], vec![1, 1], vec![4, 1]] {
            let n = shape.iter().product();
            let x =
                random_vec(31, n, 0.5, 2.0).iter().enumerate().map(|(i, v)| if i % 2 == 0 { *v } else { -v }).collect();
            check_gradients(&format!("{name} {shape:?}"), &[(x, shape.clone())], &[], 1e-2, 2e-3, 1e-2, |tape, p| {
                op(tape, &p[0])
            });
        }
    }
}

#[test]
fn l2_normalize_backward_matches_f64_reference() {
    // dx_i = sum_j dy_j * (delta_ij - y_i y_j) / norm: the full Jacobian, unlike the engine's
    // closed form.
    let (rows, cols) = (7, 45);
    let x = random_vec(41, rows * cols, -2.0, 2.0);
    let dy = random_vec(42, rows * cols, -1.0, 1.0);
    let mut want = Vec::new();
    for (xr, gr) in x.chunks(cols).zip(dy.chunks(cols)) {
        let norm = xr.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
        let y: Vec<f64> = xr.iter().map(|&v| v as f64 / norm).collect();
        for i in 0..cols {
            let delta = |j: usize| if i == j { 1.0 } else { 0.0 };
            want.push(((0..cols).map(|j| gr[j] as f64 * (delta(j) - y[i] * y[j])).sum::<f64>() / norm) as f32);
        }
    }
    for device in devices() {
        let xt = Tensor::from_slice(&x, &[rows, cols], &device).unwrap();
        let (y, norm) = l2_normalize_forward(&xt).unwrap();
        let dx = l2_normalize_backward(&y, &norm, &Tensor::from_slice(&dy, &[rows, cols], &device).unwrap()).unwrap();
        // Norms ~8, terms <= 1: f32 sums of 45 terms err by ~1e-6 relative.
        assert_close(&format!("l2_normalize backward on {}", device.name()), &dx.to_vec().unwrap(), &want, 1e-6, 1e-5);
    }
}

#[test]
fn gpu_forward_and_backward_match_cpu() {
    let Some(gpu) = gpu() else { return };
    let cpu = Device::Cpu;
    // 300 columns: not a multiple of 32 or of the block size.
    let x = random_tensor(51, &[4, 33, 300], -2.0, 2.0, &cpu);
    for (name, op) in OPS {
        let run = |device: &Device| {
            let tape = Tape::new();
            let xd = x.to_device(device).unwrap().into_trainable();
            let y = op(&tape, &xd).unwrap();
            let dy = random_tensor(52, y.shape(), -1.0, 1.0, device);
            let forward = y.to_vec().unwrap();
            let grads = tape.backward_from(&y, dy).unwrap();
            (forward, grads.get(&xd).unwrap().to_vec().unwrap())
        };
        let ((yg, dg), (yc, dc)) = (run(&gpu), run(&cpu));
        // f32 sums on the GPU vs f64 on the CPU: sums of up to 40k values in [-2, 2] (error
        // bound ~ 16 * 6e-8 * 8e4 ~ 0.08 at worst, ~1e-3 in practice) and O(1) normalised values.
        assert_close(&format!("{name} forward: gpu vs cpu"), &yg, &yc, 5e-3, 1e-5);
        assert_close(&format!("{name} backward: gpu vs cpu"), &dg, &dc, 1e-6, 1e-5);
    }
}

#[test]
fn shape_errors_name_the_shapes() {
    let scalar = Tensor::zeros(&[], &Device::Cpu).unwrap();
    for (name, op) in [("sum_last", sum_last as Op), ("mean_last", mean_last), ("l2_normalize", l2_normalize_last)] {
        let err = op(&Tape::inference(), &scalar).unwrap_err().to_string();
        assert!(err.contains(name) && err.contains("[]"), "unexpected message: {err}");
    }
    let dy = Tensor::zeros(&[3], &Device::Cpu).unwrap();
    let err = sum_last_backward(&dy, &[2, 5]).unwrap_err().to_string();
    assert!(err.contains("[3]") && err.contains("[2, 5]"), "unexpected message: {err}");

    let y = Tensor::zeros(&[2, 5], &Device::Cpu).unwrap();
    let norm = Tensor::zeros(&[2], &Device::Cpu).unwrap();
    let err = l2_normalize_backward(&y, &norm, &Tensor::zeros(&[5, 2], &Device::Cpu).unwrap()).unwrap_err().to_string();
    assert!(err.contains("[5, 2]") && err.contains("[2, 5]"), "unexpected message: {err}");
}
