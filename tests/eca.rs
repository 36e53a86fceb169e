//! ECA family (kernels/eca.cu, src/ops/eca.rs): ECA channel attention on NHWC against an f64
//! restatement of ECA-Net's module (average pool, Conv1d across channels, sigmoid, scale),
//! finite differences for x and the weight, GPU against CPU, and shape errors.

mod common;

use common::{assert_close, check_gradients, devices, gpu, random_tensor, random_vec};
use mcs_engine::ops::{eca_nhwc, eca_nhwc_forward};
use mcs_engine::{Device, Tape, Tensor};

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

/// ECA in f64 on `[B, H, W, C]` with a Conv1d weight of `k` taps: returns `(y, dx, dweight)` for
/// the upstream gradient `dy`, the gradients by the chain rule written out over the module's
/// three steps.
fn eca_f64(x: &[f32], w: &[f32], dy: &[f32], [b, h, wd, c]: [usize; 4]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (k, pixels) = (w.len(), h * wd);
    let pad = (k as isize - 1) / 2;
    let at = |bb: usize, p: usize, ch: usize| (bb * pixels + p) * c + ch;
    // Conv1d with zero padding: z[b, ch] = sum_j w[j] p[b, ch + j - pad].
    let tap_source = |ch: usize, j: usize| {
        let s = ch as isize + j as isize - pad;
        (0..c as isize).contains(&s).then_some(s as usize)
    };
    let mut pooled = vec![0.0f64; b * c];
    for bb in 0..b {
        for ch in 0..c {
            pooled[bb * c + ch] = (0..pixels).map(|p| x[at(bb, p, ch)] as f64).sum::<f64>() / pixels as f64;
        }
    }
    let mut gate = vec![0.0f64; b * c];
    for bb in 0..b {
        for ch in 0..c {
            let z: f64 = (0..k).filter_map(|j| tap_source(ch, j).map(|s| w[j] as f64 * pooled[bb * c + s])).sum();
            gate[bb * c + ch] = sigmoid(z);
        }
    }
    let mut y = vec![0.0; x.len()];
    let mut dx = vec![0.0; x.len()];
    let mut dweight = vec![0.0; k];
    for bb in 0..b {
        // dL/dg = sum_pixels dy x; dL/dz = dL/dg g (1 - g); dL/dp[s] = sum over (ch, j) reading s.
        let mut dpooled = vec![0.0f64; c];
        for ch in 0..c {
            let g = gate[bb * c + ch];
            let dg: f64 = (0..pixels).map(|p| dy[at(bb, p, ch)] as f64 * x[at(bb, p, ch)] as f64).sum();
            let dz = dg * g * (1.0 - g);
            for j in 0..k {
                if let Some(s) = tap_source(ch, j) {
                    dpooled[s] += dz * w[j] as f64;
                    dweight[j] += dz * pooled[bb * c + s];
                }
            }
        }
        for p in 0..pixels {
            for ch in 0..c {
                let i = at(bb, p, ch);
                y[i] = x[i] as f64 * gate[bb * c + ch];
                dx[i] = dy[i] as f64 * gate[bb * c + ch] + dpooled[ch] / pixels as f64;
            }
        }
    }
    (y, dx, dweight)
}

fn to_f32(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

fn check_eca(shape: [usize; 4], k: usize, seed: u64) {
    let n: usize = shape.iter().product();
    let x = random_vec(seed, n, -2.0, 2.0);
    let w = random_vec(seed ^ 1, k, -1.0, 1.0);
    let dy = random_vec(seed ^ 2, n, -1.0, 1.0);
    let (want_y, want_dx, want_dw) = eca_f64(&x, &w, &dy, shape);
    let pixels = (shape[1] * shape[2]) as f32;
    for device in devices() {
        let on = |what: &str| format!("eca {what} {shape:?} k={k} on {}", device.name());
        let tape = Tape::new();
        let xt = Tensor::from_slice(&x, &shape, &device).unwrap().into_trainable();
        let wt = Tensor::from_slice(&w, &[1, 1, k], &device).unwrap().into_trainable();
        let y = eca_nhwc(&tape, &xt, &wt).unwrap();
        // y = x g with g in (0, 1) from a mean of `pixels` values |x| <= 2 (f32 error a few
        // sqrt(pixels) u * 2 at most), through a k-tap dot and a sigmoid (slope <= 1/4): a few
        // 1e-7 in g, times |x| <= 2.
        assert_close(&on("y"), &y.to_vec().unwrap(), &to_f32(&want_y), 2e-6, 1e-6);
        let grads = tape.backward_from(&y, Tensor::from_slice(&dy, &shape, &device).unwrap()).unwrap();
        let dx = grads.get(&xt).unwrap().to_vec().unwrap();
        // dy g (error as y's) plus dp / pixels, dp a k-term sum of dz w with dz = (sum of
        // `pixels` terms |dy x| <= 2) g (1 - g): rounding ~ pixels u * 2 / 4 relative to the
        // sum's scale, divided by pixels again in dx.
        assert_close(&on("dx"), &dx, &to_f32(&want_dx), 4e-6, 1e-5);
        // dweight: B*C terms dz p with |dz| <= pixels / 2, |p| <= 2: error ~ sqrt(B C) u B C
        // pixels; 1e-6 * B C pixels covers it with margin.
        let dw = grads.get(&wt).unwrap().to_vec().unwrap();
        let dw_tol = 1e-6 * (shape[0] * shape[3]) as f32 * pixels;
        assert_close(&on("dweight"), &dw, &to_f32(&want_dw), dw_tol, 1e-5);
    }
}

#[test]
fn eca_matches_f64_on_small_and_unet_like_shapes() {
    let cases = [
        ([1, 1, 1, 1], 1),
        ([1, 1, 1, 1], 3), // every tap but the centre is padding
        ([2, 3, 4, 5], 3),
        ([1, 2, 3, 2], 5), // more taps than channels
        ([1, 2, 2, 9], 5),
        ([2, 5, 3, 33], 3),
        ([2, 14, 14, 40], 5),
        ([1, 7, 7, 70], 7),
    ];
    for (i, (shape, k)) in cases.into_iter().enumerate() {
        check_eca(shape, k, 10 + i as u64);
    }
}

/// With a zero weight every gate is sigmoid(0) = 1/2 exactly: y = x / 2 on every device.
#[test]
fn a_zero_weight_halves_the_input() {
    let x = random_vec(3, 2 * 3 * 3 * 7, -4.0, 4.0);
    for device in devices() {
        let xt = Tensor::from_slice(&x, &[2, 3, 3, 7], &device).unwrap();
        let wt = Tensor::zeros(&[1, 1, 3], &device).unwrap();
        let (y, saved) = eca_nhwc_forward(&xt, &wt).unwrap();
        assert_eq!(y.to_vec().unwrap(), x.iter().map(|v| v * 0.5).collect::<Vec<_>>(), "{}", device.name());
        assert_eq!(saved.gate.to_vec().unwrap(), vec![0.5; 14], "{}", device.name());
    }
}

// Smooth in x and w (a mean, a dot and a sigmoid): central differences with step 1e-2 have
// truncation error O(step^2 |L'''|) ~ 1e-4 and rounding ~1e-7 |L| / step ~ 1e-4 on these sizes;
// 2e-3 + 1e-2 relative is well above both and below a missing path (the pooled-mean path alone
// contributes O(0.1) to dx here).
#[test]
fn gradients_match_finite_differences() {
    let shape = vec![2, 3, 2, 6];
    let inputs = [(random_vec(30, 72, -2.0, 2.0), shape), (random_vec(31, 3, -1.0, 1.0), vec![1, 1, 3])];
    for frozen in [&[][..], &[0], &[1]] {
        check_gradients(&format!("eca (frozen {frozen:?})"), &inputs, frozen, 1e-2, 2e-3, 1e-2, |tape, p| {
            eca_nhwc(tape, &p[0], &p[1])
        });
    }
    // A large weight saturates some gates, and k = 5 with 4 channels pads on both sides.
    let inputs = [
        (random_vec(32, 2 * 2 * 3 * 4, -2.0, 2.0), vec![2, 2, 3, 4]),
        (vec![2.0, -1.5, 3.0, 0.5, -2.5], vec![1, 1, 5]),
    ];
    check_gradients("eca k=5", &inputs, &[], 1e-2, 2e-3, 1e-2, |tape, p| eca_nhwc(tape, &p[0], &p[1]));
}

#[test]
fn gpu_matches_cpu() {
    let Some(gpu) = gpu() else { return };
    // VLSM-Ensemble's bottleneck (1240 channels at 14x14, k = 5) and an odd small case.
    for (shape, k) in [([2, 14, 14, 1240], 5), ([3, 5, 7, 45], 3)] {
        let x = random_tensor(40, &shape, -2.0, 2.0, &Device::Cpu);
        let w = random_tensor(41, &[1, 1, k], -1.0, 1.0, &Device::Cpu);
        let dy = random_tensor(42, &shape, -1.0, 1.0, &Device::Cpu);
        let run = |device: &Device| {
            let tape = Tape::new();
            let xd = x.to_device(device).unwrap().into_trainable();
            let wd = w.to_device(device).unwrap().into_trainable();
            let y = eca_nhwc(&tape, &xd, &wd).unwrap();
            let grads = tape.backward_from(&y, dy.to_device(device).unwrap()).unwrap();
            let grad = |t: &Tensor| grads.get(t).unwrap().to_vec().unwrap();
            (y.to_vec().unwrap(), grad(&xd), grad(&wd))
        };
        let (g, c) = (run(&gpu), run(&Device::Cpu));
        let pixels = (shape[1] * shape[2]) as f32;
        // The GPU sums in f32 where the CPU uses f64: the same bounds as against f64 above.
        assert_close(&format!("eca y {shape:?} gpu vs cpu"), &g.0, &c.0, 2e-6, 1e-6);
        assert_close(&format!("eca dx {shape:?} gpu vs cpu"), &g.1, &c.1, 4e-6, 1e-5);
        let dw_tol = 1e-6 * (shape[0] * shape[3]) as f32 * pixels;
        assert_close(&format!("eca dweight {shape:?} gpu vs cpu"), &g.2, &c.2, dw_tol, 1e-5);
    }
}

#[test]
fn bad_shapes_are_refused_and_named() {
    let cpu = Device::Cpu;
    let z = |shape: &[usize]| Tensor::zeros(shape, &cpu).unwrap();
    let tape = Tape::inference();
    let err = eca_nhwc(&tape, &z(&[4, 4, 3]), &z(&[1, 1, 3])).unwrap_err().to_string();
    assert!(err.contains("[4, 4, 3]") && err.contains("NHWC"), "{err}");
    for bad in [&[1, 1, 4][..], &[3], &[2, 1, 3]] {
        let err = eca_nhwc(&tape, &z(&[1, 2, 2, 3]), &z(bad)).unwrap_err().to_string();
        assert!(err.contains(&format!("{bad:?}")) && err.contains("k odd"), "{err}");
    }
    let err = eca_nhwc(&tape, &z(&[1, 0, 2, 3]), &z(&[1, 1, 3])).unwrap_err().to_string();
    assert!(err.contains("zero pixels") && err.contains("[1, 0, 2, 3]"), "{err}");
}
