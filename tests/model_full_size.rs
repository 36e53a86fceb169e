//! The paper-size model (UniMedCLIP ViT-B/16 + BiomedBERT-base, 10 adapters): the engine asks for
//! exactly the official keys and shapes, and runs a forward pass on the CPU with random weights.
//! With `MCS_FULL_SIZE_DIR` pointing at the output of
//! `tools/tests/test_convert.py --write-full-size DIR` (a converted random-weight checkpoint and
//! the PyTorch reference's activations for it), it also checks parity at full size.

mod common;

use std::collections::BTreeMap;

use mcs_engine::model::weights::WeightStore;
use mcs_engine::model::{MedClipSeg, ModelConfig, NoiseMode, Sampling, Trace, UNUSED_KEYS};
use mcs_engine::{Device, Tape, Tensor};

const KEYS: &str = "tests/fixtures/unimedclip_vit_b16_keys.json";

#[test]
fn paper_config_asks_for_exactly_the_official_keys_and_runs_on_the_cpu() {
    let config = ModelConfig::unimedclip_vit_b16();
    let model = MedClipSeg::from_store(config.clone(), WeightStore::synthetic(1), &Device::Cpu).unwrap();

    let listed: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(common::repo_file(KEYS)).unwrap()).unwrap();
    let want: BTreeMap<String, (Vec<usize>, bool)> = listed
        .iter()
        .filter(|e| !UNUSED_KEYS.contains(&e["key"].as_str().unwrap()))
        .map(|e| {
            let shape = e["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
            (e["key"].as_str().unwrap().to_string(), (shape, e["trainable"].as_bool().unwrap()))
        })
        .collect();
    let got: BTreeMap<String, (Vec<usize>, bool)> =
        model.parameters().iter().map(|(k, t)| (k.clone(), (t.shape().to_vec(), t.needs_grad()))).collect();
    assert_eq!(got.len(), want.len(), "parameter count");
    for (key, expected) in &want {
        assert_eq!(got.get(key), Some(expected), "key {key}: (shape, trainable)");
    }
    let trainable: usize = model.parameters().values().filter(|t| t.needs_grad()).map(|t| t.numel()).sum();
    assert_eq!(trainable, 18_677_268, "trainable parameters (docs/model.md §1.3)");

    let pixels = Tensor::from_vec(common::random_vec(5, 3 * 224 * 224, -2.0, 2.0), &[1, 3, 224, 224]).unwrap();
    let mut ids = vec![0u32; config.text_context_length];
    ids[..6].copy_from_slice(&[2, 1037, 2235, 1999, 1996, 3]);
    let started = std::time::Instant::now();
    let out = model
        .forward(
            &Tape::inference(),
            &pixels,
            &ids,
            Sampling::inference(3, 1, NoiseMode::Plain),
            None,
            &mut Trace::disabled(),
        )
        .unwrap();
    eprintln!("full-size forward on the CPU: {:.2?}", started.elapsed());
    assert_eq!(out.logits.shape(), &[1, 224, 224]);
    assert_eq!(out.image_tokens.shape(), &[1, 197, 512]);
    let logits = out.logits.to_vec().unwrap();
    assert!(logits.iter().all(|v| v.is_finite()), "non-finite logits");
    let spread = logits.iter().cloned().fold(f32::MIN, f32::max) - logits.iter().cloned().fold(f32::MAX, f32::min);
    assert!(spread > 0.0, "constant logits: the decoder ignored its input");
}

#[test]
fn converted_full_size_checkpoint_matches_pytorch_when_provided() {
    let Ok(dir) = std::env::var("MCS_FULL_SIZE_DIR") else {
        eprintln!("skip: MCS_FULL_SIZE_DIR not set (tools/tests/test_convert.py --write-full-size DIR makes one)");
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    let config = ModelConfig::load(&dir.join("config.json")).unwrap();
    for device in common::devices() {
        let model = MedClipSeg::load(config.clone(), &dir.join("model.safetensors"), &device).unwrap();
        // reference_io holds int64 ids, which the weight store rejects: read it directly.
        let bytes = std::fs::read(dir.join("reference_io.safetensors")).unwrap();
        let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let floats = |name: &str| -> (Vec<usize>, Vec<f32>) {
            let v = file.tensor(name).unwrap();
            (
                v.shape().to_vec(),
                v.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            )
        };
        let ids: Vec<u32> = file
            .tensor("input.ids")
            .unwrap()
            .data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32)
            .collect();
        let (shape, pixels) = floats("input.pixels");
        let pixels = Tensor::from_slice(&pixels, &shape, &device).unwrap();
        let mut trace = Trace::enabled();
        let started = std::time::Instant::now();
        model
            .forward(
                &Tape::inference(),
                &pixels,
                &ids,
                Sampling::inference(20261123, 1, NoiseMode::Plain),
                None,
                &mut trace,
            )
            .unwrap();
        eprintln!("full-size forward on {}: {:.2?}", device.name(), started.elapsed());
        for (name, _) in file.tensors().into_iter().filter(|(n, _)| n.starts_with("act.")) {
            let (_, want) = floats(&name);
            let got = trace.tensors[&name].to_vec().unwrap();
            let max_diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs()));
            eprintln!("{:<28} max |diff| {max_diff:.3e} (largest |value| {scale:.2})", name);
            // 12 layers of both towers at width 768 with 256 text tokens: relative drift of a few
            // 1e-6 per op accumulates; 1e-4 relative to the largest magnitude still catches any
            // wrong formula.
            assert!(max_diff <= 1e-4 * scale, "{name} on {}: {max_diff:e}", device.name());
        }
    }
}
