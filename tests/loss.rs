//! Loss family (kernels/loss.cu, src/ops/loss.rs): BCE with logits and soft Dice (MONAI's
//! row-wise quirk and per image) against independent f64 computations and a case worked by hand,
//! gradients against finite differences, GPU against CPU, input errors, and every loss term of
//! the PyTorch training fixture (`tools/make_train_fixtures.py`) recomputed from its activations.

mod common;

use common::{assert_close, check_gradients, devices, gpu, random_tensor, random_vec};
use std::collections::BTreeMap;

use mcs_engine::ops::{bce_with_logits, narrow, soft_contrastive_loss, soft_dice_loss, DiceMode};
use mcs_engine::{Device, Tape, Tensor};
use proptest::prelude::*;

const SMOOTH: f64 = 1e-5;

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// BCEWithLogits written as the textbook expression on probabilities, evaluated in f64 where the
/// probabilities do not saturate (|x| <= 30 below, so log(p) and log(1 - p) stay finite).
fn bce_f64(x: &[f32], y: &[f32]) -> f64 {
    let total: f64 = x
        .iter()
        .zip(y)
        .map(|(&x, &y)| {
            let (x, y) = (x as f64, y as f64);
            // -(y log p + (1 - y) log(1 - p)) with log(1 - p) = log(sigmoid(-x))
            -(y * sigmoid(x).ln() + (1.0 - y) * sigmoid(-x).ln())
        })
        .sum();
    total / x.len() as f64
}

/// The soft Dice loss of one term over `pixels` (indices into x and y).
fn dice_term_f64(x: &[f32], y: &[f32], pixels: impl Iterator<Item = usize>) -> f64 {
    let (mut tp, mut p_sum, mut y_sum) = (0.0, 0.0, 0.0);
    for i in pixels {
        let p = sigmoid(x[i] as f64);
        tp += p * y[i] as f64;
        p_sum += p;
        y_sum += y[i] as f64;
    }
    1.0 - (2.0 * tp + SMOOTH) / (p_sum + y_sum + SMOOTH)
}

/// MONAI `DiceLoss(include_background=False, sigmoid=True)` on `[B, H, W]`: "channels" are the rows,
/// channel 0 is dropped, one term per (image, row >= 1).
fn dice_rows_f64(x: &[f32], y: &[f32], [b, h, w]: [usize; 3]) -> f64 {
    let mut total = 0.0;
    for image in 0..b {
        for row in 1..h {
            total += dice_term_f64(x, y, (0..w).map(|c| (image * h + row) * w + c));
        }
    }
    total / (b * (h - 1)) as f64
}

fn dice_image_f64(x: &[f32], y: &[f32], [b, h, w]: [usize; 3]) -> f64 {
    (0..b).map(|image| dice_term_f64(x, y, image * h * w..(image + 1) * h * w)).sum::<f64>() / b as f64
}

/// A binary mask with roughly `fraction` foreground.
fn binary_mask(seed: u64, n: usize, fraction: f32) -> Vec<f32> {
    random_vec(seed, n, 0.0, 1.0).iter().map(|&u| if u < fraction { 1.0 } else { 0.0 }).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn bce_matches_f64_reference(b in 1usize..4, h in 1usize..40, w in 1usize..70, scale in prop_oneof![Just(0.1f32), Just(3.0), Just(30.0)], soft in any::<bool>(), seed in any::<u64>()) {
        let shape = [b, h, w];
        let n = b * h * w;
        let x: Vec<f32> = random_vec(seed, n, -1.0, 1.0).iter().map(|v| v * scale).collect();
        let y = if soft { random_vec(seed ^ 1, n, 0.0, 1.0) } else { binary_mask(seed ^ 1, n, 0.3) };
        let want = bce_f64(&x, &y) as f32;
        for device in devices() {
            let xt = Tensor::from_slice(&x, &shape, &device).unwrap();
            let yt = Tensor::from_slice(&y, &shape, &device).unwrap();
            let loss = bce_with_logits(&Tape::inference(), &xt, &yt).unwrap();
            prop_assert_eq!(loss.shape(), &[] as &[usize]);
            // Terms up to ~30, f32 summation of up to 8k terms (block tree + per-thread runs):
            // ~1e-6 relative to the mean of the terms, which is at least ~1e-2 here.
            assert_close(&format!("bce {shape:?} on {}", device.name()), &[loss.to_scalar().unwrap()], &[want], 1e-6, 2e-5);
        }
    }

    #[test]
    fn soft_dice_matches_f64_reference(b in 1usize..4, h in 2usize..40, w in 1usize..70, soft in any::<bool>(), seed in any::<u64>()) {
        let shape = [b, h, w];
        let n = b * h * w;
        let x = random_vec(seed, n, -4.0, 4.0);
        let y = if soft { random_vec(seed ^ 2, n, 0.0, 1.0) } else { binary_mask(seed ^ 2, n, 0.3) };
        for device in devices() {
            let xt = Tensor::from_slice(&x, &shape, &device).unwrap();
            let yt = Tensor::from_slice(&y, &shape, &device).unwrap();
            for (mode, want) in [(DiceMode::Rows, dice_rows_f64(&x, &y, shape)), (DiceMode::Image, dice_image_f64(&x, &y, shape))] {
                let loss = soft_dice_loss(&Tape::inference(), &xt, &yt, mode).unwrap();
                prop_assert_eq!(loss.shape(), &[] as &[usize]);
                // Terms in [0, 1]; each is a ratio of f32 sums of <= 2800 values in [0, 1]
                // (relative error ~1e-6), then an f32 mean of <= 120 of them.
                assert_close(&format!("dice {mode:?} {shape:?} on {}", device.name()), &[loss.to_scalar().unwrap()], &[want as f32], 2e-6, 1e-5);
            }
        }
    }
}

#[test]
fn row_dice_matches_a_case_worked_by_hand() {
    // B = 1, H = 3, W = 2, logits 0 everywhere (p = 1/2). Row 0 is dropped whatever it holds.
    // Row 1, y = [1, 0]: tp = 1/2, sum p = 1, sum y = 1 -> D = 1 - (1 + s) / (2 + s).
    // Row 2, y = [0, 0]: tp = 0,   sum p = 1, sum y = 0 -> D = 1 - s / (1 + s).
    // Per image: tp = 1 (row 0: 2 * 1/2) + 1/2 (row 1) = 3/2, sum p = 3, sum y = 3 -> D = 1 - (3 + s) / (6 + s).
    let s = SMOOTH;
    let rows = ((1.0 - (1.0 + s) / (2.0 + s)) + (1.0 - s / (1.0 + s))) / 2.0;
    let image = 1.0 - (3.0 + s) / (6.0 + s);
    let y = [1.0, 1.0, 1.0, 0.0, 0.0, 0.0];
    for device in devices() {
        let xt = Tensor::zeros(&[1, 3, 2], &device).unwrap();
        let yt = Tensor::from_slice(&y, &[1, 3, 2], &device).unwrap();
        let got_rows = soft_dice_loss(&Tape::inference(), &xt, &yt, DiceMode::Rows).unwrap().to_scalar().unwrap();
        let got_image = soft_dice_loss(&Tape::inference(), &xt, &yt, DiceMode::Image).unwrap().to_scalar().unwrap();
        // A handful of f32 operations on values of order 1.
        assert_close(&format!("rows on {}", device.name()), &[got_rows], &[rows as f32], 1e-6, 0.0);
        assert_close(&format!("image on {}", device.name()), &[got_image], &[image as f32], 1e-6, 0.0);
    }
}

#[test]
fn row_dice_ignores_row_zero() {
    let shape = [2, 5, 7];
    let n = 70;
    let x = random_vec(3, n, -3.0, 3.0);
    let y = binary_mask(4, n, 0.4);
    // Changing row 0 of either image (logits and mask) leaves the row-wise loss unchanged and it
    // gets no gradient; the per-image loss does see it.
    let mut x2 = x.clone();
    let mut y2 = y.clone();
    for image in 0..2 {
        for c in 0..7 {
            x2[image * 35 + c] += 5.0;
            y2[image * 35 + c] = 1.0 - y2[image * 35 + c];
        }
    }
    for device in devices() {
        let run = |x: &[f32], y: &[f32], mode| {
            let tape = Tape::new();
            let xt = Tensor::from_slice(x, &shape, &device).unwrap().into_trainable();
            let yt = Tensor::from_slice(y, &shape, &device).unwrap();
            let loss = soft_dice_loss(&tape, &xt, &yt, mode).unwrap();
            let grad = tape.backward(&loss).unwrap().get(&xt).unwrap().to_vec().unwrap();
            (loss.to_scalar().unwrap(), grad)
        };
        let ((l1, g1), (l2, _)) = (run(&x, &y, DiceMode::Rows), run(&x2, &y2, DiceMode::Rows));
        assert_eq!(l1.to_bits(), l2.to_bits(), "row 0 changed the row-wise loss on {}", device.name());
        for image in 0..2 {
            assert!(
                g1[image * 35..image * 35 + 7].iter().all(|&g| g == 0.0),
                "row 0 got a gradient on {}",
                device.name()
            );
            assert!(g1[image * 35 + 7..(image + 1) * 35].iter().any(|&g| g != 0.0));
        }
        let (i1, i2) = (run(&x, &y, DiceMode::Image).0, run(&x2, &y2, DiceMode::Image).0);
        assert!((i1 - i2).abs() > 1e-3, "per-image loss did not see row 0 on {}: {i1} vs {i2}", device.name());
    }
}

// Finite differences in f32 with step 1e-2 of losses of order 1 computed in f64 and rounded to
// f32: rounding contributes ~6e-8 / 2e-2 ~ 3e-6; truncation ~ step^2 * |f'''| / 6 with |f'''| of
// order (1 / elements) for means of smooth terms, below 1e-5. 2e-5 absolute + 1e-2 relative
// leaves room for both; the gradients themselves are ~1e-2.
#[test]
fn gradients_match_finite_differences() {
    for shape in [vec![1, 2, 3], vec![2, 3, 4], vec![3, 4, 1]] {
        let n: usize = shape.iter().product();
        let x = random_vec(11, n, -3.0, 3.0);
        for (target_kind, y) in [("binary", binary_mask(12, n, 0.5)), ("soft", random_vec(13, n, 0.0, 1.0))] {
            let inputs = [(x.clone(), shape.clone()), (y, shape.clone())];
            let name = format!("bce {shape:?} {target_kind}");
            check_gradients(&name, &inputs, &[1], 1e-2, 2e-5, 1e-2, |tape, p| bce_with_logits(tape, &p[0], &p[1]));
            for mode in [DiceMode::Rows, DiceMode::Image] {
                let name = format!("dice {mode:?} {shape:?} {target_kind}");
                check_gradients(&name, &inputs, &[1], 1e-2, 2e-5, 1e-2, |tape, p| {
                    soft_dice_loss(tape, &p[0], &p[1], mode)
                });
            }
        }
    }
}

#[test]
fn gpu_forward_and_backward_match_cpu() {
    let Some(gpu) = gpu() else { return };
    let cpu = Device::Cpu;
    // Paper-sized maps (224 x 224, batch 3): W = 224 is not a multiple of the block sizes.
    let shape = [3, 224, 224];
    let n = 3 * 224 * 224;
    let x = random_tensor(21, &shape, -6.0, 6.0, &cpu);
    let y = Tensor::from_vec(binary_mask(22, n, 0.2), &shape).unwrap();
    type LossFn = fn(&Tape, &Tensor, &Tensor) -> mcs_engine::Result<Tensor>;
    let cases: [(&str, LossFn); 3] = [
        ("bce", bce_with_logits),
        ("dice rows", |t, x, y| soft_dice_loss(t, x, y, DiceMode::Rows)),
        ("dice image", |t, x, y| soft_dice_loss(t, x, y, DiceMode::Image)),
    ];
    for (name, f) in cases {
        let run = |device: &Device| {
            let tape = Tape::new();
            let xd = x.to_device(device).unwrap().into_trainable();
            let loss = f(&tape, &xd, &y.to_device(device).unwrap()).unwrap();
            let seed = Tensor::from_slice(&[0.7], &[], device).unwrap();
            let value = loss.to_scalar().unwrap();
            (value, tape.backward_from(&loss, seed).unwrap().get(&xd).unwrap().to_vec().unwrap())
        };
        let ((lg, gg), (lc, gc)) = (run(&gpu), run(&cpu));
        // f32 sums of up to 150k terms on the GPU against f64 on the CPU: ~1e-5 relative.
        assert_close(&format!("{name} forward: gpu vs cpu"), &[lg], &[lc], 1e-6, 2e-5);
        let scale = gc.iter().fold(0.0f32, |m, g| m.max(g.abs()));
        // Per-pixel gradients from saved f32 sums: a few roundings relative to the largest.
        assert_close(&format!("{name} backward: gpu vs cpu"), &gg, &gc, scale * 1e-5, 1e-4);
    }
}

#[test]
fn bad_inputs_are_errors_naming_the_values() {
    let cpu = Device::Cpu;
    let x = Tensor::zeros(&[2, 3, 4], &cpu).unwrap();
    let y = Tensor::zeros(&[2, 4, 3], &cpu).unwrap();
    let err = bce_with_logits(&Tape::inference(), &x, &y).unwrap_err().to_string();
    assert!(err.contains("bce_with_logits") && err.contains("[2, 3, 4]") && err.contains("[2, 4, 3]"), "{err}");
    let err = soft_dice_loss(&Tape::inference(), &x, &y, DiceMode::Image).unwrap_err().to_string();
    assert!(err.contains("[2, 3, 4]") && err.contains("[2, 4, 3]"), "{err}");

    let one_row = Tensor::zeros(&[2, 1, 4], &cpu).unwrap();
    let err = soft_dice_loss(&Tape::inference(), &one_row, &one_row, DiceMode::Rows).unwrap_err().to_string();
    assert!(err.contains("H >= 2") && err.contains("[2, 1, 4]"), "{err}");
    // Per image, a single row is fine.
    assert!(soft_dice_loss(&Tape::inference(), &one_row, &one_row, DiceMode::Image).is_ok());

    let flat = Tensor::zeros(&[8], &cpu).unwrap();
    let err = soft_dice_loss(&Tape::inference(), &flat, &flat, DiceMode::Rows).unwrap_err().to_string();
    assert!(err.contains("[B, H, W]") && err.contains("[8]"), "{err}");
    let empty = Tensor::zeros(&[0, 3], &cpu).unwrap();
    let err = bce_with_logits(&Tape::inference(), &empty, &empty).unwrap_err().to_string();
    assert!(err.contains("[0, 3]"), "{err}");
}

#[test]
fn the_target_gets_no_gradient() {
    let tape = Tape::new();
    let x = random_tensor(31, &[2, 3, 4], -1.0, 1.0, &Device::Cpu).into_trainable();
    let y = random_tensor(32, &[2, 3, 4], 0.0, 1.0, &Device::Cpu).into_trainable();
    let loss = bce_with_logits(&tape, &x, &y).unwrap();
    let dice = soft_dice_loss(&tape, &x, &y, DiceMode::Rows).unwrap();
    let total = mcs_engine::ops::add(&tape, &loss, &dice).unwrap();
    let grads = tape.backward(&total).unwrap();
    assert!(grads.get(&x).is_some());
    assert!(grads.get(&y).is_none(), "targets are data: no gradient");
}

/// The float32 tensors of the training fixture, by name.
fn read_train_fixture() -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(common::repo_file("tests/fixtures/tiny_train.safetensors"))
        .expect("tests/fixtures/tiny_train.safetensors (run tools/make_train_fixtures.py)");
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    file.tensors()
        .into_iter()
        .filter(|(_, view)| view.dtype() == safetensors::tensor::Dtype::F32)
        .map(|(name, view)| {
            let values = view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            (name, (view.shape().to_vec(), values))
        })
        .collect()
}

#[test]
fn loss_terms_match_pytorch_on_the_training_fixture() {
    let fixture = read_train_fixture();
    let get = |name: &str, device: &Device| {
        let (shape, values) = fixture.get(name).unwrap_or_else(|| panic!("fixture has no {name}"));
        Tensor::from_slice(values, shape, device).unwrap()
    };
    let scalar = |name: &str| fixture[name].1[0];
    for device in devices() {
        let tape = Tape::inference();
        let (logits, masks) = (get("act.logits", &device), get("input.masks", &device));
        // SoftCon takes the patch tokens without CLS and the raw text embedding (docs/model.md §4.2).
        let tokens = get("act.vision.tokens", &device);
        let patches = narrow(&tape, &tokens, 1, 1, tokens.dim(1) - 1).unwrap();
        let text = get("act.text.embedding", &device);
        let bce = bce_with_logits(&tape, &logits, &masks).unwrap().to_scalar().unwrap();
        let rows = soft_dice_loss(&tape, &logits, &masks, DiceMode::Rows).unwrap().to_scalar().unwrap();
        let image = soft_dice_loss(&tape, &logits, &masks, DiceMode::Image).unwrap().to_scalar().unwrap();
        let softcon = soft_contrastive_loss(&tape, &patches, &text, 0.2).unwrap().to_scalar().unwrap();
        let total = 0.5 * rows + 0.5 * bce + 0.1 * softcon;
        let on = device.name();
        // PyTorch computes these in f32 with its own reduction order: a few ulps of values ~1.
        for (name, got) in
            [("bce", bce), ("dice_rows", rows), ("dice_image", image), ("softcon", softcon), ("total", total)]
        {
            assert_close(&format!("loss.{name} on {on}"), &[got], &[scalar(&format!("loss.{name}"))], 2e-6, 2e-6);
        }
    }
}
