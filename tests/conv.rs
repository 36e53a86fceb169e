//! Conv family (kernels/conv.cu, src/ops/conv.rs): the NHWC `Conv2d` (k = 1 and 3) and the 2x2
//! stride-2 `ConvTranspose2d`, forward and every gradient against independent f64 loops, the
//! chunked im2col path, finite differences, the decoder's own formulation of the transposed
//! convolution, GPU against CPU, and shape errors.

mod common;

use common::{assert_close, assert_sums_close, check_gradients, devices, gpu, random_tensor, random_vec, Sums};
use mcs_engine::ops::{
    self, conv2d_nhwc, conv2d_nhwc_backward, conv2d_nhwc_backward_chunked, conv2d_nhwc_forward,
    conv2d_nhwc_forward_chunked, conv_transpose2x2_nhwc, conv_transpose2x2_nhwc_backward,
    conv_transpose2x2_nhwc_forward,
};
use mcs_engine::{Device, Tape, Tensor};
use proptest::prelude::*;

// ------------------------------------------------------------------------------------------------
// f64 references and an error bound for f32 sums
// ------------------------------------------------------------------------------------------------

/// The sizes of one convolution test.
#[derive(Copy, Clone, Debug)]
struct ConvCase {
    batch: usize,
    height: usize,
    width: usize,
    cin: usize,
    cout: usize,
    k: usize,
}

impl ConvCase {
    fn x_shape(self) -> Vec<usize> {
        vec![self.batch, self.height, self.width, self.cin]
    }

    fn y_shape(self) -> Vec<usize> {
        vec![self.batch, self.height, self.width, self.cout]
    }

    fn weight_shape(self) -> Vec<usize> {
        vec![self.cout, self.cin, self.k, self.k]
    }
}

fn conv(batch: usize, height: usize, width: usize, cin: usize, cout: usize, k: usize) -> ConvCase {
    ConvCase { batch, height, width, cin, cout, k }
}

/// y, dx, dweight and dbias of `nn.Conv2d(cin, cout, k, padding=k/2)` in f64, straight from the
/// definition `y[b,h,w,o] = bias[o] + sum_{c,ky,kx} x[b, h+ky-k/2, w+kx-k/2, c] w[o,c,ky,kx]`
/// (taps outside the image are zero): each (output, tap, input channel) triple contributes
/// `x * w` to y, `dy * w` to dx and `dy * x` to dweight.
fn conv_f64(s: ConvCase, x: &[f32], w: &[f32], bias: Option<&[f32]>, dy: &[f32]) -> [Sums; 4] {
    let (mut y, mut dx) = (Sums::zeros(dy.len()), Sums::zeros(x.len()));
    let (mut dw, mut db) = (Sums::zeros(w.len()), Sums::zeros(s.cout));
    let pad = (s.k / 2) as isize;
    for b in 0..s.batch {
        for h in 0..s.height {
            for wi in 0..s.width {
                for o in 0..s.cout {
                    let out = ((b * s.height + h) * s.width + wi) * s.cout + o;
                    if let Some(bias) = bias {
                        y.add(out, bias[o] as f64);
                    }
                    db.add(o, dy[out] as f64);
                    for ky in 0..s.k {
                        for kx in 0..s.k {
                            let (hh, ww) = (h as isize + ky as isize - pad, wi as isize + kx as isize - pad);
                            if hh < 0 || ww < 0 || hh >= s.height as isize || ww >= s.width as isize {
                                continue;
                            }
                            for c in 0..s.cin {
                                let input = ((b * s.height + hh as usize) * s.width + ww as usize) * s.cin + c;
                                let tap = ((o * s.cin + c) * s.k + ky) * s.k + kx;
                                y.add(out, x[input] as f64 * w[tap] as f64);
                                dx.add(input, dy[out] as f64 * w[tap] as f64);
                                dw.add(tap, dy[out] as f64 * x[input] as f64);
                            }
                        }
                    }
                }
            }
        }
    }
    [y, dx, dw, db]
}

/// `[B, H, W, Cin] -> [B, 2H, 2W, Cout]` sizes of a transposed-convolution test.
#[derive(Copy, Clone, Debug)]
struct UpCase {
    batch: usize,
    height: usize,
    width: usize,
    cin: usize,
    cout: usize,
}

impl UpCase {
    fn x_shape(self) -> Vec<usize> {
        vec![self.batch, self.height, self.width, self.cin]
    }

    fn y_shape(self) -> Vec<usize> {
        vec![self.batch, 2 * self.height, 2 * self.width, self.cout]
    }

    fn weight_shape(self) -> Vec<usize> {
        vec![self.cin, self.cout, 2, 2]
    }
}

fn up(batch: usize, height: usize, width: usize, cin: usize, cout: usize) -> UpCase {
    UpCase { batch, height, width, cin, cout }
}

/// y, dx, dweight and dbias of `nn.ConvTranspose2d(cin, cout, 2, stride=2)` in f64 from
/// `y[b, 2i+di, 2j+dj, o] = bias[o] + sum_c x[b,i,j,c] w[c,o,di,dj]`.
fn up_f64(s: UpCase, x: &[f32], w: &[f32], bias: Option<&[f32]>, dy: &[f32]) -> [Sums; 4] {
    let (mut y, mut dx) = (Sums::zeros(dy.len()), Sums::zeros(x.len()));
    let (mut dw, mut db) = (Sums::zeros(w.len()), Sums::zeros(s.cout));
    for b in 0..s.batch {
        for oh in 0..2 * s.height {
            for ow in 0..2 * s.width {
                let (i, di, j, dj) = (oh / 2, oh % 2, ow / 2, ow % 2);
                for o in 0..s.cout {
                    let out = ((b * 2 * s.height + oh) * 2 * s.width + ow) * s.cout + o;
                    if let Some(bias) = bias {
                        y.add(out, bias[o] as f64);
                    }
                    db.add(o, dy[out] as f64);
                    for c in 0..s.cin {
                        let input = ((b * s.height + i) * s.width + j) * s.cin + c;
                        let tap = ((c * s.cout + o) * 2 + di) * 2 + dj;
                        y.add(out, x[input] as f64 * w[tap] as f64);
                        dx.add(input, dy[out] as f64 * w[tap] as f64);
                        dw.add(tap, dy[out] as f64 * x[input] as f64);
                    }
                }
            }
        }
    }
    [y, dx, dw, db]
}

/// Random x, weight, bias and output gradient of the given shapes.
fn random_operands(seed: u64, x: &[usize], w: &[usize], cout: usize, y: &[usize]) -> [Vec<f32>; 4] {
    let n = |s: &[usize]| s.iter().product::<usize>();
    [
        random_vec(seed, n(x), -2.0, 2.0),
        random_vec(seed ^ 1, n(w), -1.0, 1.0),
        random_vec(seed ^ 2, cout, -1.0, 1.0),
        random_vec(seed ^ 3, n(y), -1.0, 1.0),
    ]
}

/// Every result of one op on one device against the f64 sums `want`, with a label.
fn check_results(what: &str, got: [&Tensor; 4], want: &[Sums; 4]) {
    for (name, (tensor, sums)) in ["y", "dx", "dweight", "dbias"].iter().zip(got.iter().zip(want)) {
        assert_sums_close(&format!("{what} {name}"), &tensor.to_vec().unwrap(), sums);
    }
}

// ------------------------------------------------------------------------------------------------
// Conv2d against f64
// ------------------------------------------------------------------------------------------------

/// Forward and the three gradients, untracked, on every device, with and without bias; with
/// `max_column_floats` given, through the chunked entry points.
fn check_conv_against_f64(s: ConvCase, seed: u64, max_column_floats: Option<usize>) {
    let [x, w, bias, dy] = random_operands(seed, &s.x_shape(), &s.weight_shape(), s.cout, &s.y_shape());
    for with_bias in [true, false] {
        let bias_values = with_bias.then_some(&bias[..]);
        let want = conv_f64(s, &x, &w, bias_values, &dy);
        for device in devices() {
            let xt = Tensor::from_slice(&x, &s.x_shape(), &device).unwrap();
            let wt = Tensor::from_slice(&w, &s.weight_shape(), &device).unwrap();
            let bt = bias_values.map(|b| Tensor::from_slice(b, &[s.cout], &device).unwrap());
            let dyt = Tensor::from_slice(&dy, &s.y_shape(), &device).unwrap();
            let (y, (dx, dw, db)) = match max_column_floats {
                None => (
                    conv2d_nhwc_forward(&xt, &wt, bt.as_ref()).unwrap(),
                    conv2d_nhwc_backward(&xt, &wt, &dyt, true, true, true).unwrap(),
                ),
                Some(budget) => (
                    conv2d_nhwc_forward_chunked(&xt, &wt, bt.as_ref(), budget).unwrap(),
                    conv2d_nhwc_backward_chunked(&xt, &wt, &dyt, true, true, true, budget).unwrap(),
                ),
            };
            let (dx, dw, db) = (dx.unwrap(), dw.unwrap(), db.unwrap());
            assert_eq!(
                (y.shape(), dx.shape(), dw.shape()),
                (&s.y_shape()[..], &s.x_shape()[..], &s.weight_shape()[..])
            );
            let what = format!("conv {s:?} bias {with_bias} budget {max_column_floats:?} on {}", device.name());
            check_results(&what, [&y, &dx, &dw, &db], &want);
        }
    }
}

#[test]
fn conv_matches_f64_on_edge_and_odd_shapes() {
    // 1x1 images and single rows/columns (every 3x3 tap but the centre is padding), odd sizes,
    // H != W, Cin != Cout both ways, batch > 1, channel counts that are not multiples of 16.
    let cases = [
        conv(1, 1, 1, 1, 1, 3),
        conv(1, 1, 6, 2, 3, 3),
        conv(2, 5, 1, 3, 2, 3),
        conv(2, 5, 7, 3, 4, 3),
        conv(3, 4, 3, 17, 5, 3),
        conv(1, 6, 9, 5, 33, 3),
        conv(2, 5, 7, 3, 4, 1),
        conv(1, 3, 2, 19, 7, 1),
    ];
    for (k, s) in cases.into_iter().enumerate() {
        check_conv_against_f64(s, 100 + k as u64, None);
    }
}

/// The chunked path: budgets that force one image per chunk (0 columns: still one image), two
/// images per chunk with a short last chunk (3 images), and a budget that holds the batch.
#[test]
fn conv_chunked_matches_f64() {
    let s = conv(3, 5, 4, 6, 5, 3);
    let per_image = s.height * s.width * 9 * s.cin;
    for budget in [0, per_image, 2 * per_image + 1, 3 * per_image] {
        check_conv_against_f64(s, 7, Some(budget));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    #[test]
    fn conv_matches_f64_reference(
        b in 1usize..3, h in 1usize..7, w in 1usize..7, cin in 1usize..12, cout in 1usize..12,
        k in prop_oneof![Just(1usize), Just(3usize)], seed in any::<u64>(),
    ) {
        check_conv_against_f64(conv(b, h, w, cin, cout, k), seed, None);
    }
}

/// A check that needs no reference loop: a 3x3 weight that is the identity on one tap shifts
/// the image by that tap's offset and fills the vacated border with zeros.
#[test]
fn conv_single_tap_identity_shifts_the_image() {
    let (h, w, c) = (4usize, 5usize, 2usize);
    let x: Vec<f32> = (0..h * w * c).map(|v| v as f32 + 1.0).collect();
    for device in devices() {
        let xt = Tensor::from_slice(&x, &[1, h, w, c], &device).unwrap();
        for tap in 0..9 {
            let (dy, dx) = (tap as isize / 3 - 1, tap as isize % 3 - 1);
            let mut weight = vec![0.0f32; c * c * 9];
            for ch in 0..c {
                weight[(ch * c + ch) * 9 + tap] = 1.0;
            }
            let wt = Tensor::from_slice(&weight, &[c, c, 3, 3], &device).unwrap();
            let y = conv2d_nhwc_forward(&xt, &wt, None).unwrap().to_vec().unwrap();
            for (p, out) in y.chunks(c).enumerate() {
                let (sh, sw) = ((p / w) as isize + dy, (p % w) as isize + dx);
                let inside = (0..h as isize).contains(&sh) && (0..w as isize).contains(&sw);
                for (ch, &v) in out.iter().enumerate() {
                    let want = if inside { x[(sh as usize * w + sw as usize) * c + ch] } else { 0.0 };
                    assert_eq!(v, want, "tap {tap}, pixel {p}, channel {ch} on {}", device.name());
                }
            }
        }
    }
}

#[test]
fn conv_of_empty_sizes() {
    for device in devices() {
        let tape = Tape::inference();
        let bias = Tensor::from_slice(&[0.5, -1.0], &[2], &device).unwrap();
        // No images: an empty output.
        let x = Tensor::zeros(&[0, 3, 3, 4], &device).unwrap();
        let w = Tensor::ones(&[2, 4, 3, 3], &device).unwrap();
        let y = conv2d_nhwc(&tape, &x, &w, Some(&bias)).unwrap();
        assert_eq!(y.shape(), [0, 3, 3, 2]);
        // No input channels: the bias alone, at every pixel.
        let x = Tensor::zeros(&[1, 2, 3, 0], &device).unwrap();
        let w = Tensor::zeros(&[2, 0, 3, 3], &device).unwrap();
        let y = conv2d_nhwc(&tape, &x, &w, Some(&bias)).unwrap().to_vec().unwrap();
        assert_eq!(y, [0.5, -1.0].repeat(6), "on {}", device.name());
        let dy = Tensor::ones(&[1, 2, 3, 2], &device).unwrap();
        let (dx, dw, db) = conv2d_nhwc_backward(&x, &w, &dy, true, true, true).unwrap();
        assert_eq!((dx.unwrap().shape(), dw.unwrap().shape()), (&[1, 2, 3, 0][..], &[2, 0, 3, 3][..]));
        assert_eq!(db.unwrap().to_vec().unwrap(), [6.0, 6.0]);
    }
}

// ------------------------------------------------------------------------------------------------
// ConvTranspose2d against f64 and against the decoder's formulation
// ------------------------------------------------------------------------------------------------

fn check_up_against_f64(s: UpCase, seed: u64) {
    let [x, w, bias, dy] = random_operands(seed, &s.x_shape(), &s.weight_shape(), s.cout, &s.y_shape());
    for with_bias in [true, false] {
        let bias_values = with_bias.then_some(&bias[..]);
        let want = up_f64(s, &x, &w, bias_values, &dy);
        for device in devices() {
            let xt = Tensor::from_slice(&x, &s.x_shape(), &device).unwrap();
            let wt = Tensor::from_slice(&w, &s.weight_shape(), &device).unwrap();
            let bt = bias_values.map(|b| Tensor::from_slice(b, &[s.cout], &device).unwrap());
            let dyt = Tensor::from_slice(&dy, &s.y_shape(), &device).unwrap();
            let y = conv_transpose2x2_nhwc_forward(&xt, &wt, bt.as_ref()).unwrap();
            let (dx, dw, db) = conv_transpose2x2_nhwc_backward(&xt, &wt, &dyt, true, true, true).unwrap();
            let (dx, dw, db) = (dx.unwrap(), dw.unwrap(), db.unwrap());
            assert_eq!(
                (y.shape(), dx.shape(), dw.shape()),
                (&s.y_shape()[..], &s.x_shape()[..], &s.weight_shape()[..])
            );
            let what = format!("conv_transpose {s:?} bias {with_bias} on {}", device.name());
            check_results(&what, [&y, &dx, &dw, &db], &want);
        }
    }
}

#[test]
fn conv_transpose_matches_f64() {
    let cases = [up(1, 1, 1, 1, 1), up(2, 3, 5, 4, 3), up(1, 4, 1, 2, 7), up(3, 2, 3, 17, 9), up(1, 5, 4, 33, 16)];
    for (k, s) in cases.into_iter().enumerate() {
        check_up_against_f64(s, 200 + k as u64);
    }
}

/// The decoder's ScaleBlock computes the same upsampling with a matmul, a permute and a bias add
/// (src/model/decoder.rs); restated here op for op, it must give the very same bits: the GEMM is
/// the same call and the bias is added to each element once, in the same f32 operation.
#[test]
fn conv_transpose_equals_the_decoders_matmul_permute_add() {
    let (b, h, w, e) = (2, 3, 5, 12);
    let x = random_vec(31, b * h * w * e, -2.0, 2.0);
    let weight = random_vec(32, e * e * 4, -1.0, 1.0);
    let bias = random_vec(33, e, -1.0, 1.0);
    for device in devices() {
        let t = Tape::inference();
        let xt = Tensor::from_slice(&x, &[b, h, w, e], &device).unwrap();
        let wt = Tensor::from_slice(&weight, &[e, e, 2, 2], &device).unwrap();
        let bt = Tensor::from_slice(&bias, &[e], &device).unwrap();
        let rows = ops::reshape(&t, &xt, &[b * h * w, e]).unwrap();
        let wr = ops::reshape(&t, &ops::permute(&t, &wt, &[0, 2, 3, 1]).unwrap(), &[e, 4 * e]).unwrap();
        let z = ops::reshape(&t, &ops::matmul(&t, &rows, &wr).unwrap(), &[b, h, w, 2, 2, e]).unwrap();
        let z = ops::reshape(&t, &ops::permute(&t, &z, &[0, 1, 3, 2, 4, 5]).unwrap(), &[b, 2 * h, 2 * w, e]).unwrap();
        let want = ops::add(&t, &z, &bt).unwrap().to_vec().unwrap();
        let got = conv_transpose2x2_nhwc(&t, &xt, &wt, Some(&bt)).unwrap().to_vec().unwrap();
        assert_eq!(got, want, "on {}", device.name());
    }
}

// ------------------------------------------------------------------------------------------------
// Finite differences (through the tape)
// ------------------------------------------------------------------------------------------------

// Both ops are bilinear in (x, weight) and affine in the bias, so central differences are exact
// up to rounding: with eps 1e-2, the probe's f32 rounding on outputs of size ~10 is about
// 1e-6 / eps = 1e-4 per output, 1e-3 absolute + 1e-3 relative leaves a 10x margin, far below
// the O(0.1) error of a wrong or missing tap.
const FD: (f32, f32, f32) = (1e-2, 1e-3, 1e-3);

#[test]
fn conv_gradients_match_finite_differences() {
    for s in [conv(2, 3, 4, 3, 2, 3), conv(2, 3, 2, 4, 3, 1)] {
        let [x, w, bias, _] = random_operands(50 + s.k as u64, &s.x_shape(), &s.weight_shape(), s.cout, &s.y_shape());
        let with_bias = [(x.clone(), s.x_shape()), (w.clone(), s.weight_shape()), (bias, vec![s.cout])];
        for frozen in [&[][..], &[0], &[1], &[2]] {
            let name = format!("conv {s:?} with bias (frozen {frozen:?})");
            check_gradients(&name, &with_bias, frozen, FD.0, FD.1, FD.2, |tape, p| {
                conv2d_nhwc(tape, &p[0], &p[1], Some(&p[2]))
            });
        }
        let without = [(x, s.x_shape()), (w, s.weight_shape())];
        check_gradients(&format!("conv {s:?} without bias"), &without, &[], FD.0, FD.1, FD.2, |tape, p| {
            conv2d_nhwc(tape, &p[0], &p[1], None)
        });
    }
}

#[test]
fn conv_transpose_gradients_match_finite_differences() {
    let s = up(2, 2, 3, 3, 4);
    let [x, w, bias, _] = random_operands(60, &s.x_shape(), &s.weight_shape(), s.cout, &s.y_shape());
    let with_bias = [(x.clone(), s.x_shape()), (w.clone(), s.weight_shape()), (bias, vec![s.cout])];
    for frozen in [&[][..], &[0], &[1], &[2]] {
        let name = format!("conv_transpose {s:?} with bias (frozen {frozen:?})");
        check_gradients(&name, &with_bias, frozen, FD.0, FD.1, FD.2, |tape, p| {
            conv_transpose2x2_nhwc(tape, &p[0], &p[1], Some(&p[2]))
        });
    }
    let without = [(x, s.x_shape()), (w, s.weight_shape())];
    check_gradients(&format!("conv_transpose {s:?} without bias"), &without, &[], FD.0, FD.1, FD.2, |tape, p| {
        conv_transpose2x2_nhwc(tape, &p[0], &p[1], None)
    });
}

// ------------------------------------------------------------------------------------------------
// GPU against CPU
// ------------------------------------------------------------------------------------------------

/// y and the gradients of x, weight and bias of `op` through the tape on `device`.
fn tape_run(
    device: &Device,
    operands: [&Tensor; 4],
    op: impl Fn(&Tape, &Tensor, &Tensor, &Tensor) -> mcs_engine::Result<Tensor>,
) -> [Vec<f32>; 4] {
    let [x, w, b, dy] = operands;
    let tape = Tape::new();
    let on = |t: &Tensor| t.to_device(device).unwrap().into_trainable();
    let (xd, wd, bd) = (on(x), on(w), on(b));
    let y = op(&tape, &xd, &wd, &bd).unwrap();
    let grads = tape.backward_from(&y, dy.to_device(device).unwrap()).unwrap();
    let grad = |t: &Tensor| grads.get(t).unwrap().to_vec().unwrap();
    [y.to_vec().unwrap(), grad(&xd), grad(&wd), grad(&bd)]
}

/// Compares the four results of a GPU run with the CPU's. Every value is a sum of up to `terms`
/// products `|x w| <= 2`, `|dy w| <= 1` or `|dy x| <= 2` (the bias gradient: of `terms` values
/// `|dy| <= 1`), computed in f32 in different orders (cuBLAS's blocking against the gemm crate's).
/// With random signs the rounding error of either order is a random walk of about
/// `u sqrt(terms) * 2 * sqrt(terms)` = `2 u terms`; the tolerance is 20x that (so 10x for each
/// side), which a wrong element (an O(1) error) cannot meet. On the emulator (whose cuBLAS sums in
/// f64) the differences measured 20 to 170 times below these tolerances.
fn assert_gpu_matches_cpu(what: &str, gpu: &[Vec<f32>; 4], cpu: &[Vec<f32>; 4], terms: [usize; 4]) {
    for (k, name) in ["y", "dx", "dweight", "dbias"].iter().enumerate() {
        let atol = 20.0 * 2.0 * terms[k] as f32 * f32::EPSILON / 2.0;
        assert_close(&format!("{what} {name} gpu vs cpu"), &gpu[k], &cpu[k], atol, 1e-6);
    }
}

#[test]
fn conv_gpu_matches_cpu() {
    let Some(gpu) = gpu() else { return };
    // k = 3 and k = 1 with odd sizes and channel counts (one chunk each: the chunked GPU path is
    // compared in the test below).
    for (seed, s) in
        [conv(2, 9, 11, 19, 23, 3), conv(1, 14, 14, 64, 40, 3), conv(2, 7, 5, 33, 17, 1)].into_iter().enumerate()
    {
        let operands = [
            random_tensor(seed as u64, &s.x_shape(), -2.0, 2.0, &Device::Cpu),
            random_tensor(seed as u64 + 10, &s.weight_shape(), -1.0, 1.0, &Device::Cpu),
            random_tensor(seed as u64 + 20, &[s.cout], -1.0, 1.0, &Device::Cpu),
            random_tensor(seed as u64 + 30, &s.y_shape(), -1.0, 1.0, &Device::Cpu),
        ];
        let op = |t: &Tape, x: &Tensor, w: &Tensor, b: &Tensor| conv2d_nhwc(t, x, w, Some(b));
        let [g, c] =
            [&gpu, &Device::Cpu].map(|d| tape_run(d, [&operands[0], &operands[1], &operands[2], &operands[3]], op));
        let pixels = s.batch * s.height * s.width;
        let taps = s.k * s.k;
        let terms = [taps * s.cin + 1, taps * s.cout, pixels, pixels];
        assert_gpu_matches_cpu(&format!("conv {s:?}"), &g, &c, terms);
    }
}

/// The chunked path on the GPU (one image per chunk, and 2 + 1) against the CPU's unchunked one.
#[test]
fn conv_chunked_gpu_matches_cpu() {
    let Some(gpu) = gpu() else { return };
    let s = conv(3, 6, 5, 7, 9, 3);
    let [x, w, bias, dy] = random_operands(70, &s.x_shape(), &s.weight_shape(), s.cout, &s.y_shape());
    let make = |device: &Device| {
        let t = |v: &[f32], shape: &[usize]| Tensor::from_slice(v, shape, device).unwrap();
        (t(&x, &s.x_shape()), t(&w, &s.weight_shape()), t(&bias, &[s.cout]), t(&dy, &s.y_shape()))
    };
    let (xc, wc, bc, dyc) = make(&Device::Cpu);
    let y = conv2d_nhwc_forward(&xc, &wc, Some(&bc)).unwrap().to_vec().unwrap();
    let (dx, dw, db) = conv2d_nhwc_backward(&xc, &wc, &dyc, true, true, true).unwrap();
    let cpu = [y, dx.unwrap().to_vec().unwrap(), dw.unwrap().to_vec().unwrap(), db.unwrap().to_vec().unwrap()];
    let (xg, wg, bg, dyg) = make(&gpu);
    let per_image = s.height * s.width * 9 * s.cin;
    for budget in [per_image, 2 * per_image] {
        let y = conv2d_nhwc_forward_chunked(&xg, &wg, Some(&bg), budget).unwrap().to_vec().unwrap();
        let (dx, dw, db) = conv2d_nhwc_backward_chunked(&xg, &wg, &dyg, true, true, true, budget).unwrap();
        let gpu_run = [y, dx.unwrap().to_vec().unwrap(), dw.unwrap().to_vec().unwrap(), db.unwrap().to_vec().unwrap()];
        let pixels = s.batch * s.height * s.width;
        let terms = [9 * s.cin + 1, 9 * s.cout, pixels, pixels];
        assert_gpu_matches_cpu(&format!("conv {s:?} chunk budget {budget}"), &gpu_run, &cpu, terms);
    }
}

#[test]
fn conv_transpose_gpu_matches_cpu() {
    let Some(gpu) = gpu() else { return };
    for (seed, s) in [up(2, 5, 6, 13, 7), up(1, 7, 7, 48, 24)].into_iter().enumerate() {
        let operands = [
            random_tensor(seed as u64, &s.x_shape(), -2.0, 2.0, &Device::Cpu),
            random_tensor(seed as u64 + 10, &s.weight_shape(), -1.0, 1.0, &Device::Cpu),
            random_tensor(seed as u64 + 20, &[s.cout], -1.0, 1.0, &Device::Cpu),
            random_tensor(seed as u64 + 30, &s.y_shape(), -1.0, 1.0, &Device::Cpu),
        ];
        let op = |t: &Tape, x: &Tensor, w: &Tensor, b: &Tensor| conv_transpose2x2_nhwc(t, x, w, Some(b));
        let [g, c] =
            [&gpu, &Device::Cpu].map(|d| tape_run(d, [&operands[0], &operands[1], &operands[2], &operands[3]], op));
        let pixels = s.batch * s.height * s.width;
        let terms = [s.cin + 1, 4 * s.cout, pixels, 4 * pixels];
        assert_gpu_matches_cpu(&format!("conv_transpose {s:?}"), &g, &c, terms);
    }
}

// ------------------------------------------------------------------------------------------------
// Shape errors
// ------------------------------------------------------------------------------------------------

/// Runs `f` and returns its error message, failing if it succeeded.
fn error_of<T>(f: impl FnOnce() -> mcs_engine::Result<T>) -> String {
    match f() {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

/// Fails unless `err` contains every one of `parts`.
fn assert_names(err: &str, parts: &[&str]) {
    assert!(parts.iter().all(|p| err.contains(p)), "message {err:?} should name {parts:?}");
}

#[test]
fn conv_rejects_bad_shapes_and_names_them() {
    let zeros = |shape: &[usize]| Tensor::zeros(shape, &Device::Cpu).unwrap();
    let tape = Tape::inference();
    let x = zeros(&[1, 4, 4, 3]);

    assert_names(
        &error_of(|| conv2d_nhwc(&tape, &zeros(&[4, 4, 3]), &zeros(&[2, 3, 3, 3]), None)),
        &["[4, 4, 3]", "NHWC"],
    );
    for bad in [[2, 3, 5, 5], [2, 3, 2, 2], [2, 4, 3, 3], [2, 3, 3, 1]] {
        let err = error_of(|| conv2d_nhwc(&tape, &x, &zeros(&bad), None));
        assert_names(&err, &[&format!("{bad:?}"), "[1, 4, 4, 3]", "k = 1 or 3"]);
    }
    assert_names(&error_of(|| conv2d_nhwc(&tape, &x, &zeros(&[2, 3, 3]), None)), &["[2, 3, 3]"]);
    let err = error_of(|| conv2d_nhwc(&tape, &x, &zeros(&[2, 3, 3, 3]), Some(&zeros(&[3]))));
    assert_names(&err, &["bias [3]", "[2, 3, 3, 3]"]);
    let err = error_of(|| conv2d_nhwc_backward(&x, &zeros(&[2, 3, 1, 1]), &zeros(&[1, 4, 4, 3]), true, true, true));
    assert_names(&err, &["[1, 4, 4, 3]", "[1, 4, 4, 2]"]);

    let up_x = zeros(&[1, 2, 3, 4]);
    let err = error_of(|| conv_transpose2x2_nhwc(&tape, &zeros(&[2, 3, 4]), &zeros(&[4, 2, 2, 2]), None));
    assert_names(&err, &["[2, 3, 4]", "NHWC"]);
    for bad in [&[3, 2, 2, 2][..], &[4, 2, 3, 3], &[4, 2, 2]] {
        let err = error_of(|| conv_transpose2x2_nhwc(&tape, &up_x, &zeros(bad), None));
        assert_names(&err, &[&format!("{bad:?}"), "[1, 2, 3, 4]", "[4, Cout, 2, 2]"]);
    }
    let err = error_of(|| conv_transpose2x2_nhwc(&tape, &up_x, &zeros(&[4, 2, 2, 2]), Some(&zeros(&[4]))));
    assert_names(&err, &["bias [4]", "[4, 2, 2, 2]"]);
    let err = error_of(|| {
        conv_transpose2x2_nhwc_backward(&up_x, &zeros(&[4, 2, 2, 2]), &zeros(&[1, 2, 3, 2]), true, true, true)
    });
    assert_names(&err, &["[1, 2, 3, 2]", "[1, 4, 6, 2]"]);
}
