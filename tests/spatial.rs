//! Spatial family (kernels/spatial.cu, src/ops/spatial.rs): the depthwise 3x3 NHWC convolution and
//! the bilinear resize (align_corners=False) against independent f64 loops, against PyTorch's own
//! outputs (tests/fixtures/bilinear_torch.json), against finite differences, and GPU against CPU.

mod common;

use common::{assert_close, assert_sums_close, check_gradients, devices, gpu, random_tensor, random_vec, Sums};
use mcs_engine::ops::{
    depthwise_conv3x3_nhwc, depthwise_conv3x3_nhwc_backward_input, depthwise_conv3x3_nhwc_backward_weight,
    depthwise_conv3x3_nhwc_forward, resize_bilinear_nchw, resize_bilinear_nchw_backward, resize_bilinear_nchw_forward,
    resize_bilinear_rows_forward,
};
use mcs_engine::{Device, Tape, Tensor};
use proptest::prelude::*;

/// Index of pixel (b, h, w, c) in an NHWC buffer.
fn nhwc(b: usize, h: usize, w: usize, c: usize, [_, height, width, channels]: [usize; 4]) -> usize {
    ((b * height + h) * width + w) * channels + c
}

/// Every (output pixel, tap) pair of a 3x3 zero-padded depthwise convolution, as
/// `(output index, input index, weight index)`, taps outside the image left out.
fn depthwise_pairs(shape: [usize; 4]) -> Vec<(usize, usize, usize)> {
    let [batch, height, width, channels] = shape;
    let mut pairs = Vec::new();
    for b in 0..batch {
        for h in 0..height {
            for w in 0..width {
                for c in 0..channels {
                    for i in 0..3 {
                        for j in 0..3 {
                            let (hh, ww) = (h as isize + i as isize - 1, w as isize + j as isize - 1);
                            if hh < 0 || ww < 0 || hh >= height as isize || ww >= width as isize {
                                continue;
                            }
                            let input = nhwc(b, hh as usize, ww as usize, c, shape);
                            pairs.push((nhwc(b, h, w, c, shape), input, c * 9 + i * 3 + j));
                        }
                    }
                }
            }
        }
    }
    pairs
}

/// y, dx and dweight of the depthwise convolution in f64, straight from the definition
/// `y[o] = sum over pairs of x[input] * weight[tap]`: every pair contributes `x * w` to y,
/// `dy * w` to dx and `dy * x` to dweight.
fn depthwise_f64(x: &[f32], weight: &[f32], dy: &[f32], shape: [usize; 4]) -> (Sums, Sums, Sums) {
    let (mut y, mut dx, mut dweight) = (Sums::zeros(x.len()), Sums::zeros(x.len()), Sums::zeros(weight.len()));
    for (out, input, tap) in depthwise_pairs(shape) {
        y.add(out, x[input] as f64 * weight[tap] as f64);
        dx.add(input, dy[out] as f64 * weight[tap] as f64);
        dweight.add(tap, dy[out] as f64 * x[input] as f64);
    }
    (y, dx, dweight)
}

/// PyTorch's sampling rule for align_corners=False, as documented: the source position is computed
/// in f32 as `max((dst + 0.5) * (in / out) - 0.5, 0)`; the left neighbour is its floor (at most
/// in-1), the right one the next index clamped to in-1, weighted by the fractional part.
fn source_taps(dst: usize, in_size: usize, out_size: usize) -> [(usize, f64); 2] {
    let scale = in_size as f32 / out_size as f32;
    let src = ((dst as f32 + 0.5) * scale - 0.5).max(0.0) as f64;
    let left = (src.floor() as usize).min(in_size - 1);
    let right = (left + 1).min(in_size - 1);
    let frac = (src - left as f64).clamp(0.0, 1.0);
    [(left, 1.0 - frac), (right, frac)]
}

/// Sizes of a resize test: `[N, C, H, W]` to `[N, C, out_h, out_w]`.
#[derive(Copy, Clone, Debug)]
struct ResizeCase {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    out_h: usize,
    out_w: usize,
}

impl ResizeCase {
    fn input_shape(self) -> [usize; 4] {
        [self.n, self.c, self.h, self.w]
    }

    fn output_shape(self) -> [usize; 4] {
        [self.n, self.c, self.out_h, self.out_w]
    }
}

/// Bilinear y and dx in f64: each output reads four (weight, input) pairs; y gathers them and
/// dx receives `weight * dy` at each.
fn bilinear_f64(x: &[f32], dy: &[f32], r: ResizeCase) -> (Sums, Sums) {
    let (mut y, mut dx) = (Sums::zeros(dy.len()), Sums::zeros(x.len()));
    for plane in 0..r.n * r.c {
        for oy in 0..r.out_h {
            for ox in 0..r.out_w {
                let out = (plane * r.out_h + oy) * r.out_w + ox;
                for (iy, wy) in source_taps(oy, r.h, r.out_h) {
                    for (ix, wx) in source_taps(ox, r.w, r.out_w) {
                        let input = (plane * r.h + iy) * r.w + ix;
                        y.add(out, wy * wx * x[input] as f64);
                        dx.add(input, wy * wx * dy[out] as f64);
                    }
                }
            }
        }
    }
    (y, dx)
}

// ------------------------------------------------------------------------------------------------
// Depthwise 3x3 convolution
// ------------------------------------------------------------------------------------------------

/// Forward, input gradient and weight gradient on every device against the f64 definition.
fn check_depthwise_against_f64(shape: [usize; 4], seed: u64) {
    let channels = shape[3];
    let n: usize = shape.iter().product();
    let x = random_vec(seed, n, -2.0, 2.0);
    let weight = random_vec(seed ^ 1, channels * 9, -1.0, 1.0);
    let dy = random_vec(seed ^ 2, n, -1.0, 1.0);
    let (want_y, want_dx, want_dweight) = depthwise_f64(&x, &weight, &dy, shape);
    for device in devices() {
        let xt = Tensor::from_slice(&x, &shape, &device).unwrap();
        let wt = Tensor::from_slice(&weight, &[channels, 1, 3, 3], &device).unwrap();
        let dyt = Tensor::from_slice(&dy, &shape, &device).unwrap();
        let on = |what: &str| format!("depthwise {what} {shape:?} on {}", device.name());
        let y = depthwise_conv3x3_nhwc_forward(&xt, &wt).unwrap();
        assert_eq!(y.shape(), shape);
        assert_sums_close(&on("forward"), &y.to_vec().unwrap(), &want_y);
        let dx = depthwise_conv3x3_nhwc_backward_input(&dyt, &wt).unwrap();
        assert_sums_close(&on("dx"), &dx.to_vec().unwrap(), &want_dx);
        let dweight = depthwise_conv3x3_nhwc_backward_weight(&dyt, &xt).unwrap();
        assert_eq!(dweight.shape(), [channels, 1, 3, 3]);
        assert_sums_close(&on("dweight"), &dweight.to_vec().unwrap(), &want_dweight);
    }
}

#[test]
fn depthwise_matches_f64_on_edge_and_decoder_like_shapes() {
    // 1x1 and single-row/column images (every tap but the centre is padding), odd sizes, channel
    // counts that are not multiples of 32, and the decoder's 14x14 / 28x28 grids.
    let shapes = [
        [1, 1, 1, 1],
        [1, 1, 1, 5],
        [1, 1, 6, 1],
        [1, 7, 1, 3],
        [2, 5, 7, 3],
        [1, 3, 3, 33],
        [2, 14, 14, 40],
        [1, 28, 28, 67],
    ];
    for (k, shape) in shapes.into_iter().enumerate() {
        check_depthwise_against_f64(shape, 100 + k as u64);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn depthwise_matches_f64_reference(
        b in 1usize..3, h in 1usize..11, w in 1usize..11, c in 1usize..70, seed in any::<u64>(),
    ) {
        check_depthwise_against_f64([b, h, w, c], seed);
    }
}

/// A tap-by-tap check that needs no reference loop: a weight that is 1 at a single tap shifts
/// the image by that tap's offset, filling the vacated border with zeros.
#[test]
fn depthwise_single_tap_weight_shifts_the_image() {
    let shape = [1, 4, 5, 2];
    let x: Vec<f32> = (0..40).map(|v| v as f32 + 1.0).collect();
    for device in devices() {
        let xt = Tensor::from_slice(&x, &shape, &device).unwrap();
        for tap in 0..9 {
            let (di, dj) = (tap as isize / 3 - 1, tap as isize % 3 - 1);
            let mut weight = vec![0.0f32; 18];
            weight[tap] = 1.0; // channel 0 only; channel 1 has an all-zero kernel
            let wt = Tensor::from_slice(&weight, &[2, 1, 3, 3], &device).unwrap();
            let y = depthwise_conv3x3_nhwc_forward(&xt, &wt).unwrap().to_vec().unwrap();
            for h in 0..4isize {
                for w in 0..5isize {
                    let (sh, sw) = (h + di, w + dj);
                    let inside = (0..4).contains(&sh) && (0..5).contains(&sw);
                    let want = if inside { x[((sh * 5 + sw) * 2) as usize] } else { 0.0 };
                    let at = ((h * 5 + w) * 2) as usize;
                    assert_eq!(y[at], want, "tap {tap} at ({h}, {w}) on {}", device.name());
                    assert_eq!(y[at + 1], 0.0, "channel 1 must stay zero (tap {tap}) on {}", device.name());
                }
            }
        }
    }
}

// Both ops are bilinear in (x, weight), so central differences are exact up to rounding: with
// eps 1e-2 on sums of about nine O(1) products, f32 rounding in the probe is ~1e-6 / eps = 1e-4.
// 1e-3 absolute + 1e-3 relative is ten times that, far below any wrong tap (an O(1) error).
#[test]
fn depthwise_gradients_match_finite_differences() {
    let shape = vec![2, 4, 5, 3];
    let x = random_vec(11, 2 * 4 * 5 * 3, -2.0, 2.0);
    let weight = random_vec(12, 3 * 9, -1.0, 1.0);
    let inputs = [(x, shape), (weight, vec![3, 1, 3, 3])];
    for frozen in [&[][..], &[0], &[1]] {
        check_gradients(&format!("depthwise (frozen {frozen:?})"), &inputs, frozen, 1e-2, 1e-3, 1e-3, |tape, p| {
            depthwise_conv3x3_nhwc(tape, &p[0], &p[1])
        });
    }
}

#[test]
fn depthwise_gpu_matches_cpu() {
    let Some(gpu) = gpu() else { return };
    // The decoder's shapes: 512 channels at 28x28 and 56x56, plus an odd channel count.
    for shape in [[2, 28, 28, 512], [1, 56, 56, 512], [3, 13, 17, 45]] {
        let channels = shape[3];
        let x = random_tensor(21, &shape, -2.0, 2.0, &Device::Cpu);
        let weight = random_tensor(22, &[channels, 1, 3, 3], -1.0, 1.0, &Device::Cpu);
        let dy = random_tensor(23, &shape, -1.0, 1.0, &Device::Cpu);
        let run = |device: &Device| {
            let tape = Tape::new();
            let xd = x.to_device(device).unwrap().into_trainable();
            let wd = weight.to_device(device).unwrap().into_trainable();
            let y = depthwise_conv3x3_nhwc(&tape, &xd, &wd).unwrap();
            let grads = tape.backward_from(&y, dy.to_device(device).unwrap()).unwrap();
            let grad = |t: &Tensor| grads.get(t).unwrap().to_vec().unwrap();
            (y.to_vec().unwrap(), grad(&xd), grad(&wd))
        };
        let (gpu_run, cpu_run) = (run(&gpu), run(&Device::Cpu));
        // y and dx: the same nine products summed in the same order; only FMA contraction on the
        // GPU differs, a few ulp of values below 20.
        assert_close(&format!("depthwise y {shape:?} gpu vs cpu"), &gpu_run.0, &cpu_run.0, 1e-5, 1e-6);
        assert_close(&format!("depthwise dx {shape:?} gpu vs cpu"), &gpu_run.1, &cpu_run.1, 1e-5, 1e-6);
        // dweight sums up to 3136 products |dy * x| <= 2 in different orders (per-row partials on
        // the CPU, per-chunk partials on the GPU). Random signs make the partial sums random walks
        // of size ~sqrt(n), so each order's rounding error is about u * n ~ 2e-4; 2e-3 is 10x that.
        assert_close(&format!("depthwise dweight {shape:?} gpu vs cpu"), &gpu_run.2, &cpu_run.2, 2e-3, 1e-5);
    }
}

/// Runs `f` and returns its error message, failing if it succeeded.
fn error_of(f: impl FnOnce() -> mcs_engine::Result<Tensor>) -> String {
    match f() {
        Ok(t) => panic!("expected an error, got a tensor of shape {:?}", t.shape()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn depthwise_rejects_bad_shapes_and_names_them() {
    let cpu = Device::Cpu;
    let zeros = |shape: &[usize]| Tensor::zeros(shape, &cpu).unwrap();
    let tape = Tape::inference();

    let err = error_of(|| depthwise_conv3x3_nhwc(&tape, &zeros(&[4, 4, 3]), &zeros(&[3, 1, 3, 3])));
    assert!(err.contains("[4, 4, 3]") && err.contains("NHWC"), "unexpected message: {err}");

    let err = error_of(|| depthwise_conv3x3_nhwc(&tape, &zeros(&[1, 4, 4, 3]), &zeros(&[4, 1, 3, 3])));
    let names_all = ["[4, 1, 3, 3]", "[1, 4, 4, 3]", "[3, 1, 3, 3]"].iter().all(|s| err.contains(s));
    assert!(names_all, "unexpected message: {err}");

    let err = error_of(|| depthwise_conv3x3_nhwc(&tape, &zeros(&[1, 4, 4, 3]), &zeros(&[3, 1, 5, 5])));
    assert!(err.contains("[3, 1, 5, 5]"), "unexpected message: {err}");

    let err = error_of(|| depthwise_conv3x3_nhwc_backward_weight(&zeros(&[1, 4, 5, 3]), &zeros(&[1, 4, 4, 3])));
    assert!(err.contains("[1, 4, 5, 3]") && err.contains("[1, 4, 4, 3]"), "unexpected message: {err}");

    let err = error_of(|| depthwise_conv3x3_nhwc_backward_input(&zeros(&[1, 4, 4, 2]), &zeros(&[3, 1, 3, 3])));
    assert!(err.contains("[1, 4, 4, 2]") && err.contains("[3, 1, 3, 3]"), "unexpected message: {err}");
}

#[test]
fn depthwise_of_an_empty_batch_is_empty() {
    for device in devices() {
        let x = Tensor::zeros(&[0, 3, 3, 4], &device).unwrap();
        let w = Tensor::ones(&[4, 1, 3, 3], &device).unwrap();
        assert_eq!(depthwise_conv3x3_nhwc_forward(&x, &w).unwrap().shape(), [0, 3, 3, 4]);
        let dweight = depthwise_conv3x3_nhwc_backward_weight(&x, &x).unwrap();
        assert_eq!(dweight.to_vec().unwrap(), vec![0.0; 36]);
    }
}

// ------------------------------------------------------------------------------------------------
// Bilinear resize
// ------------------------------------------------------------------------------------------------

/// Forward and backward on every device against the f64 loops.
fn check_bilinear_against_f64(r: ResizeCase, seed: u64) {
    let x = random_vec(seed, r.input_shape().iter().product(), -4.0, 4.0);
    let dy = random_vec(seed ^ 1, r.output_shape().iter().product(), -1.0, 1.0);
    let (want_y, want_dx) = bilinear_f64(&x, &dy, r);
    for device in devices() {
        let on = |what: &str| format!("bilinear {what} {r:?} on {}", device.name());
        let xt = Tensor::from_slice(&x, &r.input_shape(), &device).unwrap();
        let y = resize_bilinear_nchw_forward(&xt, r.out_h, r.out_w).unwrap();
        assert_eq!(y.shape(), r.output_shape());
        assert_sums_close(&on("forward"), &y.to_vec().unwrap(), &want_y);
        let dyt = Tensor::from_slice(&dy, &r.output_shape(), &device).unwrap();
        let dx = resize_bilinear_nchw_backward(&dyt, r.h, r.w).unwrap();
        assert_eq!(dx.shape(), r.input_shape());
        assert_sums_close(&on("dx"), &dx.to_vec().unwrap(), &want_dx);
    }
}

const fn resize(n: usize, c: usize, h: usize, w: usize, out_h: usize, out_w: usize) -> ResizeCase {
    ResizeCase { n, c, h, w, out_h, out_w }
}

#[test]
fn bilinear_matches_f64_on_edge_and_decoder_like_shapes() {
    let cases = [
        resize(1, 1, 1, 1, 1, 1),
        resize(1, 2, 1, 1, 5, 3),     // a single pixel broadcast
        resize(1, 1, 4, 4, 16, 16),   // 4x upsampling
        resize(2, 3, 14, 14, 56, 56), // the decoder's grids
        resize(1, 1, 56, 56, 224, 224),
        resize(1, 1, 224, 224, 56, 56), // 4x downsampling
        resize(1, 3, 7, 5, 3, 2),
        resize(2, 1, 5, 13, 13, 5), // up on one axis, down on the other
        resize(1, 33, 6, 9, 6, 4),  // one axis unchanged
        resize(1, 2, 10, 3, 7, 11), // non-integer ratios
    ];
    for (k, r) in cases.into_iter().enumerate() {
        check_bilinear_against_f64(r, 200 + k as u64);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn bilinear_matches_f64_reference(
        n in 1usize..3, c in 1usize..4, h in 1usize..24, w in 1usize..24,
        out_h in 1usize..40, out_w in 1usize..40, seed in any::<u64>(),
    ) {
        check_bilinear_against_f64(resize(n, c, h, w, out_h, out_w), seed);
    }
}

/// A band of output rows is those rows of the whole resize, bit for bit, on every device (the
/// segmenter makes full-resolution maps one band at a time); bands that are empty or run past the
/// output are errors.
#[test]
fn a_band_of_rows_is_those_rows_of_the_whole_resize() {
    let (planes, h, w, out_h, out_w) = (3, 7, 5, 23, 11);
    let x = random_vec(41, planes * h * w, -4.0, 4.0);
    for device in devices() {
        let xt = Tensor::from_slice(&x, &[1, planes, h, w], &device).unwrap();
        let whole = resize_bilinear_nchw_forward(&xt, out_h, out_w).unwrap().to_vec().unwrap();
        for rows in [0..1, 0..out_h, 5..12, 22..23] {
            let band = resize_bilinear_rows_forward(&xt, out_h, out_w, rows.clone()).unwrap();
            assert_eq!(band.shape(), [1, planes, rows.len(), out_w]);
            let want: Vec<f32> = (0..planes)
                .flat_map(|p| whole[(p * out_h + rows.start) * out_w..(p * out_h + rows.end) * out_w].to_vec())
                .collect();
            assert!(band.to_vec().unwrap() == want, "rows {rows:?} on {}", device.name());
        }
        for rows in [3..3, 20..24] {
            let err = resize_bilinear_rows_forward(&xt, out_h, out_w, rows.clone()).unwrap_err().to_string();
            assert!(err.contains("not a band of the 23 output rows"), "{rows:?}: {err}");
        }
    }
}

/// At an unchanged size the rule samples exactly at pixel centres (src = dst, weight 0 on the
/// neighbour), so the output is the input bit for bit and so is the gradient.
#[test]
fn bilinear_at_the_same_size_is_the_identity() {
    let x = random_vec(31, 2 * 3 * 7 * 9, -4.0, 4.0);
    for device in devices() {
        let xt = Tensor::from_slice(&x, &[2, 3, 7, 9], &device).unwrap();
        assert_eq!(resize_bilinear_nchw_forward(&xt, 7, 9).unwrap().to_vec().unwrap(), x, "on {}", device.name());
        assert_eq!(resize_bilinear_nchw_backward(&xt, 7, 9).unwrap().to_vec().unwrap(), x, "on {}", device.name());
    }
}

#[derive(serde::Deserialize)]
struct TorchFixture {
    torch: String,
    cases: Vec<TorchCase>,
}

#[derive(serde::Deserialize)]
struct TorchCase {
    input_shape: Vec<usize>,
    output_size: [usize; 2],
    input: Vec<f32>,
    output: Vec<f32>,
    output_grad: Vec<f32>,
    input_grad: Vec<f32>,
}

/// PyTorch's own answers, written by tools/make_bilinear_fixture.py: this pins the source-index
/// rule (which the f64 tests above restate rather than prove) to the real `F.interpolate`.
#[test]
fn bilinear_matches_pytorch_fixture() {
    let path = common::repo_file("tests/fixtures/bilinear_torch.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let fixture: TorchFixture = serde_json::from_str(&text).unwrap();
    assert!(fixture.cases.len() >= 5, "fixture has too few cases");
    for device in devices() {
        for case in &fixture.cases {
            let [out_h, out_w] = case.output_size;
            let (shape, device_name) = (&case.input_shape, device.name());
            let what = format!("{shape:?} -> {out_h}x{out_w} on {device_name} vs torch {}", fixture.torch);
            let tape = Tape::new();
            let x = Tensor::from_slice(&case.input, &case.input_shape, &device).unwrap().into_trainable();
            let y = resize_bilinear_nchw(&tape, &x, out_h, out_w).unwrap();
            // Same sample positions (same f32 index rule); only the blend's association differs
            // from torch's, a few ulp of outputs below 4 (ulp 4.8e-7; 9e-7 seen with torch 2.15).
            // A wrong index rule (no half-pixel shift, align_corners=True) is off by ~0.1.
            assert_close(&format!("forward {what}"), &y.to_vec().unwrap(), &case.output, 2e-6, 1e-6);
            let upstream = Tensor::from_slice(&case.output_grad, y.shape(), &device).unwrap();
            let grads = tape.backward_from(&y, upstream).unwrap();
            // Sums of at most 64 weighted upstream values (4x per axis here), below 22 in size;
            // torch scatters in another order. Seen: at most 1 ulp (9.5e-7 near 8). 4e-6 + 1e-6
            // relative allows a few ulp of the largest gradients.
            let dx = grads.get(&x).unwrap().to_vec().unwrap();
            assert_close(&format!("input grad {what}"), &dx, &case.input_grad, 4e-6, 1e-6);
        }
    }
}

// The resize is linear in x, so central differences are exact up to rounding: eps 1e-2 on sums
// of O(1) values gives ~1e-6 / eps = 1e-4 of rounding in the probe; 1e-3 leaves a 10x margin.
#[test]
fn bilinear_gradient_matches_finite_differences() {
    let cases = [resize(1, 2, 3, 4, 5, 7), resize(1, 1, 7, 6, 3, 4), resize(2, 1, 2, 5, 9, 2)];
    for (k, r) in cases.into_iter().enumerate() {
        let x = random_vec(40 + k as u64, r.input_shape().iter().product(), -2.0, 2.0);
        check_gradients(
            &format!("bilinear {r:?}"),
            &[(x, r.input_shape().to_vec())],
            &[],
            1e-2,
            1e-3,
            1e-3,
            |tape, p| resize_bilinear_nchw(tape, &p[0], r.out_h, r.out_w),
        );
    }
}

#[test]
fn bilinear_gpu_matches_cpu() {
    let Some(gpu) = gpu() else { return };
    for r in [resize(4, 1, 56, 56, 224, 224), resize(2, 3, 224, 224, 56, 56), resize(2, 5, 13, 17, 30, 7)] {
        let x = random_tensor(51, &r.input_shape(), -4.0, 4.0, &Device::Cpu);
        let dy = random_tensor(52, &r.output_shape(), -1.0, 1.0, &Device::Cpu);
        let run = |device: &Device| {
            let tape = Tape::new();
            let xd = x.to_device(device).unwrap().into_trainable();
            let y = resize_bilinear_nchw(&tape, &xd, r.out_h, r.out_w).unwrap();
            let grads = tape.backward_from(&y, dy.to_device(device).unwrap()).unwrap();
            (y.to_vec().unwrap(), grads.get(&xd).unwrap().to_vec().unwrap())
        };
        let (gpu_run, cpu_run) = (run(&gpu), run(&Device::Cpu));
        // Identical sample positions (the launcher passes the CPU's f32 scale and the kernel
        // avoids FMA in the index maths); the 4-term blend may contract to FMA: a few ulp of 4.
        assert_close(&format!("bilinear y {r:?} gpu vs cpu"), &gpu_run.0, &cpu_run.0, 3e-6, 1e-6);
        // Gather (GPU) against scatter (CPU) of at most ~100 terms |w * dy| <= 1 per input pixel.
        assert_close(&format!("bilinear dx {r:?} gpu vs cpu"), &gpu_run.1, &cpu_run.1, 2e-5, 1e-5);
    }
}

#[test]
fn bilinear_rejects_bad_shapes_and_names_them() {
    let cpu = Device::Cpu;
    let zeros = |shape: &[usize]| Tensor::zeros(shape, &cpu).unwrap();
    let tape = Tape::inference();

    let err = error_of(|| resize_bilinear_nchw(&tape, &zeros(&[3, 4, 4]), 8, 8));
    assert!(err.contains("[3, 4, 4]") && err.contains("NCHW"), "unexpected message: {err}");

    let err = error_of(|| resize_bilinear_nchw(&tape, &zeros(&[1, 1, 4, 4]), 0, 8));
    assert!(err.contains("4x4 to 0x8") && err.contains("[1, 1, 4, 4]"), "unexpected message: {err}");

    let err = error_of(|| resize_bilinear_nchw(&tape, &zeros(&[1, 1, 0, 4]), 2, 2));
    assert!(err.contains("0x4 to 2x2") && err.contains("[1, 1, 0, 4]"), "unexpected message: {err}");

    let err = error_of(|| resize_bilinear_nchw_backward(&zeros(&[1, 2, 8, 8]), 0, 4));
    assert!(err.contains("0x4 to 8x8") && err.contains("[1, 2, 8, 8]"), "unexpected message: {err}");

    let err = error_of(|| resize_bilinear_nchw_backward(&zeros(&[2, 8, 8]), 4, 4));
    assert!(err.contains("[2, 8, 8]"), "unexpected message: {err}");
}
