//! Pool family (kernels/pool.cu, src/ops/pool.rs): nn.MaxPool2d(2) on NHWC against an independent
//! restatement of PyTorch's rule (first maximum wins ties, NaN wins), odd sizes, finite
//! differences, GPU against CPU (bit for bit: pooling only selects), and shape errors.

mod common;

use common::{assert_close, check_gradients, devices, gpu, random_vec};
use mcs_engine::ops::{max_pool2x2_nhwc, max_pool2x2_nhwc_backward, max_pool2x2_nhwc_forward};
use mcs_engine::{Device, Tape, Tensor};

/// The index (into x) that window (b, oh, ow, c) passes on, restated from PyTorch's documented
/// behaviour: if the window holds NaNs the last of them in row-major order (its scan replaces the
/// best on every NaN), else the first position holding the window's largest value.
fn chosen(x: &[f32], [_, h, w, c]: [usize; 4], b: usize, oh: usize, ow: usize, ch: usize) -> usize {
    let at = |i: usize, j: usize| ((b * h + 2 * oh + i) * w + 2 * ow + j) * c + ch;
    let window = [at(0, 0), at(0, 1), at(1, 0), at(1, 1)];
    if let Some(&last_nan) = window.iter().rev().find(|&&k| x[k].is_nan()) {
        return last_nan;
    }
    let largest = window.iter().map(|&k| x[k]).fold(f32::NEG_INFINITY, f32::max);
    *window.iter().find(|&&k| x[k] == largest).unwrap()
}

/// Forward and backward on every device against the restatement; both must be exact (NaN where
/// the reference has NaN).
fn check_pool(x: &[f32], shape: [usize; 4], seed: u64) {
    let [b, h, w, c] = shape;
    let out_shape = [b, h / 2, w / 2, c];
    let dy = random_vec(seed, out_shape.iter().product(), -1.0, 1.0);
    let mut want_y = Vec::new();
    let mut want_dx = vec![0.0f32; x.len()];
    for bb in 0..b {
        for oh in 0..h / 2 {
            for ow in 0..w / 2 {
                for ch in 0..c {
                    let k = chosen(x, shape, bb, oh, ow, ch);
                    want_y.push(x[k]);
                    want_dx[k] = dy[want_y.len() - 1];
                }
            }
        }
    }
    for device in devices() {
        let on = format!("{shape:?} on {}", device.name());
        let xt = Tensor::from_slice(x, &shape, &device).unwrap();
        let y = max_pool2x2_nhwc_forward(&xt).unwrap();
        assert_eq!(y.shape(), out_shape, "{on}");
        let y = y.to_vec().unwrap();
        let same = y.iter().zip(&want_y).all(|(a, b)| a == b || (a.is_nan() && b.is_nan()));
        assert!(same, "forward {on}: {y:?} vs {want_y:?}");
        let dyt = Tensor::from_slice(&dy, &out_shape, &device).unwrap();
        let dx = max_pool2x2_nhwc_backward(&xt, &dyt).unwrap().to_vec().unwrap();
        assert_eq!(dx, want_dx, "backward {on}");
    }
}

#[test]
fn pooling_matches_the_restatement_on_even_odd_and_tiny_shapes() {
    let shapes = [[1, 1, 1, 1], [1, 2, 2, 1], [1, 3, 5, 2], [2, 4, 6, 3], [2, 7, 9, 33], [1, 1, 4, 2], [3, 8, 8, 40]];
    for (k, shape) in shapes.into_iter().enumerate() {
        let x = random_vec(k as u64, shape.iter().product(), -3.0, 3.0);
        check_pool(&x, shape, 100 + k as u64);
    }
}

/// Values from {0, 1, 2} make most windows tie: the first maximum alone gets the gradient.
#[test]
fn ties_go_to_the_first_maximum_in_row_major_order() {
    let shape = [2, 6, 8, 5];
    let x: Vec<f32> = random_vec(7, 480, 0.0, 3.0).into_iter().map(f32::floor).collect();
    check_pool(&x, shape, 8);
    // All equal: every window picks its top-left element, including an all -inf window.
    for fill in [1.5f32, f32::NEG_INFINITY] {
        let x = vec![fill; 16];
        check_pool(&x, [1, 4, 4, 1], 9);
    }
}

/// NaN anywhere in a window makes its output NaN (and takes the gradient); other windows are
/// unaffected.
#[test]
fn nan_wins_its_window() {
    let shape = [1, 4, 4, 2];
    let mut x = random_vec(11, 32, -1.0, 1.0);
    x[0] = f32::NAN; // window (0, 0), channel 0, top-left
    x[2 * 4 * 2 + 2 * 2 + 1] = f32::NAN; // window (1, 1), channel 1, top-left
    x[3 * 4 * 2 + 3 * 2 + 1] = f32::NAN; // same window, bottom-right: the last NaN wins
    x[2 + 1] = f32::INFINITY; // window (0, 0), channel 1: an infinite maximum is just a maximum
    check_pool(&x, shape, 12);
}

// Max pooling is piecewise linear: with every pair of values at least 0.1 apart (a shuffled
// ladder), central differences with step 1e-2 never cross a switch and are exact up to f32
// rounding, ~1e-7 / 1e-2 per output. 1e-3 is ten times that; a wrong routing is off by O(1).
#[test]
fn gradient_matches_finite_differences() {
    let shape = vec![2, 5, 4, 3];
    let n = 120;
    let mut order: Vec<usize> = (0..n).collect();
    let keys = random_vec(13, n, 0.0, 1.0);
    order.sort_by(|&a, &b| keys[a].total_cmp(&keys[b]));
    let x: Vec<f32> = order.iter().map(|&r| r as f32 * 0.1 - 6.0).collect();
    check_gradients("max_pool2x2", &[(x, shape)], &[], 1e-2, 1e-3, 1e-3, |tape, p| max_pool2x2_nhwc(tape, &p[0]));
}

#[test]
fn gpu_matches_cpu_bit_for_bit() {
    let Some(gpu) = gpu() else { return };
    for (shape, ties) in [([2, 56, 56, 64], false), ([3, 13, 17, 45], true)] {
        let n: usize = shape.iter().product();
        let mut x = random_vec(20, n, -3.0, 3.0);
        if ties {
            x.iter_mut().for_each(|v| *v = v.floor());
        }
        let dy = random_vec(21, n / 4, -1.0, 1.0);
        let run = |device: &Device| {
            let tape = Tape::new();
            let xd = Tensor::from_slice(&x, &shape, device).unwrap().into_trainable();
            let y = max_pool2x2_nhwc(&tape, &xd).unwrap();
            let dyd = Tensor::from_slice(&dy[..y.numel()], y.shape(), device).unwrap();
            let grads = tape.backward_from(&y, dyd).unwrap();
            (y.to_vec().unwrap(), grads.get(&xd).unwrap().to_vec().unwrap())
        };
        let (g, c) = (run(&gpu), run(&Device::Cpu));
        // Selection only, no arithmetic: identical on both devices.
        assert_close(&format!("max_pool y {shape:?} gpu vs cpu"), &g.0, &c.0, 0.0, 0.0);
        assert_close(&format!("max_pool dx {shape:?} gpu vs cpu"), &g.1, &c.1, 0.0, 0.0);
    }
}

#[test]
fn bad_shapes_are_refused_and_named() {
    let cpu = Device::Cpu;
    let z = |shape: &[usize]| Tensor::zeros(shape, &cpu).unwrap();
    let err = max_pool2x2_nhwc(&Tape::inference(), &z(&[4, 4, 3])).unwrap_err().to_string();
    assert!(err.contains("[4, 4, 3]") && err.contains("NHWC"), "{err}");
    let err = max_pool2x2_nhwc_backward(&z(&[1, 4, 5, 3]), &z(&[1, 2, 3, 3])).unwrap_err().to_string();
    assert!(err.contains("[1, 2, 3, 3]") && err.contains("[1, 4, 5, 3]") && err.contains("[1, 2, 2, 3]"), "{err}");
}
