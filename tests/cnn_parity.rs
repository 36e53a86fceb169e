//! CNN-branch parity with PyTorch: replays `tests/fixtures/tiny_cnn_{weights,forward}.safetensors`
//! (`tools/make_cnn_fixtures.py`: the tiny model with VLSM-Ensemble's branch at width 0.125, random
//! weights and running statistics, dropout 0) through the engine. Compares the branch's named
//! activations and the fused logits in eval mode (decoder convolutions repeated, the paper code's
//! quirk, and not), the Monte-Carlo prediction, and a training pass: loss terms, the gradient of
//! every trainable parameter and the running statistics after it. CPU always, GPU when present.

mod common;

use std::collections::BTreeMap;

use common::{devices, read_fixture, Fixture};
use mcs_engine::model::weights::WeightStore;
use mcs_engine::model::{CnnBranchConfig, ItemNoise, MedClipSeg, ModelConfig, NoiseMode, Sampling, Trace, TrainRecipe};
use mcs_engine::train::step::{losses, DeviceBatch, StepNoise};
use mcs_engine::{Device, Tape, Tensor};

const WEIGHTS: &str = "tests/fixtures/tiny_weights.safetensors";
const CNN_WEIGHTS: &str = "tests/fixtures/tiny_cnn_weights.safetensors";
const FORWARD: &str = "tests/fixtures/tiny_cnn_forward.safetensors";

/// The fixture's branch (its metadata says the same; checked below).
fn config(repeat_decoder_conv: bool) -> ModelConfig {
    let mut config = ModelConfig::tiny();
    config.cnn_branch =
        Some(CnnBranchConfig { width: 0.125, dropout: 0.0, repeat_decoder_conv, ..CnnBranchConfig::default() });
    config.trainable.push("cnn.".into());
    config
}

fn model(config: ModelConfig, device: &Device) -> MedClipSeg {
    let mut tensors = WeightStore::load(&common::repo_file(WEIGHTS)).unwrap().into_tensors();
    tensors.extend(WeightStore::load(&common::repo_file(CNN_WEIGHTS)).unwrap().into_tensors());
    MedClipSeg::from_store(config, WeightStore::from_tensors("tiny + cnn fixtures", tensors), device).unwrap()
}

fn tensor(fixture: &Fixture, name: &str, device: &Device) -> Tensor {
    let (shape, values) = &fixture.tensors[name];
    Tensor::from_slice(values, shape, device).unwrap()
}

/// Largest |a - b| and the largest |b|.
fn max_diff(a: &[f32], b: &[f32]) -> (f32, f32) {
    assert_eq!(a.len(), b.len());
    let diff = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    (diff, b.iter().fold(0.0f32, |m, v| m.max(v.abs())))
}

/// The forward tolerance of tests/model_parity.rs: both sides strict FP32 with different
/// summation orders (GEMM blocking, im2col against PyTorch's direct convolution, reductions),
/// ~1e-6 relative per op through the towers and the branch's 20 layers; 1e-4 of the tensor's
/// largest magnitude (at least 1) covers that and still catches a wrong formula (1e-2 or more).
fn forward_tolerance(want: &[f32]) -> f32 {
    1e-4 * want.iter().fold(1.0f32, |m, v| m.max(v.abs()))
}

fn compare(what: &str, got: &Tensor, want: &(Vec<usize>, Vec<f32>), tolerance: f32) -> bool {
    assert_eq!(got.shape(), &want.0[..], "{what}: shape");
    let (diff, _) = max_diff(&got.to_vec().unwrap(), &want.1);
    let ok = diff <= tolerance;
    println!(
        "{what:<44} {:>18} {diff:>12.3e} {tolerance:>12.3e}  {}",
        format!("{:?}", want.0),
        if ok { "yes" } else { "NO" }
    );
    ok
}

#[test]
fn fixture_metadata_names_this_branch() {
    let bytes = std::fs::read(common::repo_file(FORWARD)).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let branch: serde_json::Value = serde_json::from_str(&header.metadata().as_ref().unwrap()["branch"]).unwrap();
    let want = config(true).cnn_branch.unwrap();
    assert_eq!(branch["width"].as_f64(), Some(want.width));
    assert_eq!(branch["vision_layer"].as_u64(), Some(want.vision_layer as u64));
    assert_eq!(branch["repeat_decoder_conv"].as_bool(), Some(true));
    assert_eq!(branch["dropout"].as_f64(), Some(0.0));
    assert_eq!(branch["bn_momentum"].as_f64().map(|m| m as f32), Some(want.bn_momentum));
    assert_eq!(branch["bn_eps"].as_f64().map(|e| e as f32), Some(want.bn_eps));
}

#[test]
fn eval_forward_and_monte_carlo_match_pytorch() {
    let fixture = read_fixture(FORWARD);
    for device in devices() {
        let pixels = tensor(&fixture, "input.pixels", &device);
        let sampling =
            Sampling { seed: fixture.seed, first_draw: 0, samples: 1, mode: NoiseMode::Plain, items: ItemNoise::ByRow };
        let mut failures = Vec::new();
        println!("\nCNN-branch parity on {}", device.name());
        for repeat in [true, false] {
            let model = model(config(repeat), &device);
            let mut trace = Trace::enabled();
            let out = model.forward(&Tape::inference(), &pixels, &fixture.ids, sampling, None, &mut trace).unwrap();
            if !repeat {
                let want = &fixture.tensors["once.act.cnn.fused"];
                if !compare("once.act.cnn.fused", &out.logits, want, forward_tolerance(&want.1)) {
                    failures.push("once.act.cnn.fused".to_string());
                }
                continue;
            }
            let mut compared = 0;
            for (name, want) in fixture.tensors.iter().filter(|(n, _)| n.starts_with("act.")) {
                let got = trace.tensors.get(name).unwrap_or_else(|| panic!("the engine does not trace {name}"));
                compared += 1;
                if !compare(name, got, want, forward_tolerance(&want.1)) {
                    failures.push(name.clone());
                }
            }
            // 4 encoder stages, features, bottleneck, 4 decoder stages, logits, fused, and
            // MedCLIPSeg's own logits.
            assert_eq!(compared, 13, "activations compared");
            // The reference keys each batch item's noise by its row.
            let sampling = Sampling { samples: 3, ..sampling };
            let prediction = model.predict_sampled(&pixels, &fixture.ids, sampling).unwrap();
            for (name, got) in [
                ("mc.logits", &prediction.logits),
                ("mc.probability", &prediction.probability),
                ("mc.uncertainty", &prediction.uncertainty),
            ] {
                let want = &fixture.tensors[name];
                if !compare(name, got, want, forward_tolerance(&want.1)) {
                    failures.push(name.to_string());
                }
            }
        }
        assert!(failures.is_empty(), "{} differ from PyTorch on {}: {failures:?}", failures.len(), device.name());
    }
}

#[test]
fn training_pass_matches_pytorch() {
    let fixture = read_fixture(FORWARD);
    for device in devices() {
        let model = model(config(true), &device);
        let (size, masks) = (model.config().image_size, &fixture.tensors["input.masks"].1);
        let batch =
            DeviceBatch::new(&fixture.tensors["input.pixels"].1, masks, fixture.ids.clone(), size, &device).unwrap();
        let tape = Tape::new();
        let noise = StepNoise { seed: fixture.seed, draw: 0, text_dropout: 0.0 };
        let step = losses(&model, &tape, &batch, &TrainRecipe::default(), noise).unwrap();
        for (name, got) in [
            ("train.loss.bce", step.values.bce),
            ("train.loss.dice_rows", step.values.dice),
            ("train.loss.softcon", step.values.softcon),
            ("train.loss.total", step.values.total),
        ] {
            let want = fixture.tensors[name].1[0];
            // The budget of tests/train_parity.rs: means of O(1) values, 1e-5 relative.
            assert!((got - want).abs() <= 1e-5 * want.abs().max(1.0), "{name} on {}: {got} vs {want}", device.name());
        }

        let running: BTreeMap<String, Tensor> = step.running_statistics.iter().cloned().collect();
        let mut running_compared = 0;
        for (name, want) in fixture.tensors.iter().filter(|(n, _)| n.starts_with("train.running.")) {
            let key = &name["train.running.".len()..];
            let got = running.get(key).unwrap_or_else(|| panic!("no running statistic {key} after the pass"));
            // A mean or variance over the batch, then one multiply-add: the forward budget.
            assert!(compare(name, got, want, forward_tolerance(&want.1)), "{name} on {}", device.name());
            running_compared += 1;
        }
        assert_eq!(running_compared, 16, "8 batch norms, mean and variance each");
        assert_eq!(running.len(), 16, "the pass updates every batch norm once");

        let grads = tape.backward(&step.total).unwrap();
        let (mut compared, mut worst) = (0, (0.0f32, String::new()));
        for (key, param) in model.trainable_parameters() {
            let want = &fixture.tensors[&format!("train.grad.{key}")];
            let got = grads.get(param).unwrap_or_else(|| panic!("no gradient for {key}"));
            assert_eq!(got.shape(), &want.0[..], "{key}");
            let (diff, scale) = max_diff(&got.to_vec().unwrap(), &want.1);
            // The gradient budget of tests/train_parity.rs (2e-4 of the tensor's largest entry).
            // The absolute 1e-7 covers gradients that are zero in exact arithmetic and rounding
            // noise on both sides: norm_k.bias (docs/model.md §10.9), and the bias of a convolution that
            // feeds a training-mode batch norm, which subtracts every constant shift again.
            let tolerance = 2e-4 * scale + 1e-7;
            assert!(diff <= tolerance, "grad of {key} on {}: max abs diff {diff:e} > {tolerance:e}", device.name());
            if scale > 1e-5 && diff / scale > worst.0 {
                worst = (diff / scale.max(1e-12), key.clone());
            }
            compared += 1;
        }
        let cnn_trained = model.trainable_parameters().filter(|(k, _)| k.starts_with("cnn.")).count();
        println!(
            "{}: {compared} gradients ({cnn_trained} of the branch), worst relative to the tensor's largest entry {:.2e} ({}; \
             gradients below 1e-5, rounding noise, excluded)",
            device.name(),
            worst.0,
            worst.1
        );
        assert_eq!(compared, fixture.tensors.keys().filter(|k| k.starts_with("train.grad.")).count());
        assert!(cnn_trained > 40, "the branch's parameters are trained ({cnn_trained})");
    }
}
