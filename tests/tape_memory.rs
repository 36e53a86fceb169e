//! How much a training forward pass keeps for the backward, measured by the live tensor bytes.
//! Alone in its test binary: the byte counter is process-wide, so concurrent tests would disturb it.

mod common;

use mcs_engine::model::weights::WeightStore;
use mcs_engine::model::{MedClipSeg, ModelConfig, Sampling, Trace};
use mcs_engine::tensor::live_tensor_bytes;
use mcs_engine::{ops, Device, Tape};

/// Bytes that stay alive after a training forward pass of `config` (what the tape saved plus
/// the outputs), for a batch of 2.
fn tape_bytes(config: &ModelConfig) -> usize {
    let model = MedClipSeg::from_store(config.clone(), WeightStore::synthetic(3), &Device::Cpu).unwrap();
    let s = config.image_size;
    let pixels = common::random_tensor(1, &[2, 3, s, s], -1.0, 1.0, &Device::Cpu);
    let ids: Vec<u32> = (0..2 * config.text_context_length).map(|i| (i % 7) as u32 + 1).collect();
    let tape = Tape::new();
    let before = live_tensor_bytes();
    let out = model
        .forward(
            &tape,
            &pixels,
            &ids,
            Sampling::inference(1, 1, mcs_engine::model::NoiseMode::Plain),
            None,
            &mut Trace::disabled(),
        )
        .unwrap();
    let loss = ops::mean_all(&tape, &out.logits).unwrap();
    let kept = live_tensor_bytes() - before;
    drop((loss, out, tape));
    kept
}

#[test]
fn frozen_towers_keep_less_for_the_backward_than_trained_ones() {
    let frozen = ModelConfig::tiny();
    let mut trained = frozen.clone();
    trained.trainable.extend(["vision_model".to_string(), "text_model".to_string()]);
    let (frozen_bytes, trained_bytes) = (tape_bytes(&frozen), tape_bytes(&trained));
    println!("tape keeps {frozen_bytes} bytes with frozen towers, {trained_bytes} with trained towers (tiny, batch 2)");
    // A frozen linear keeps its weight (which exists anyway), not its input: the towers' saved
    // activations shrink. On the tiny config that is more than a tenth of all kept bytes.
    assert!(
        (frozen_bytes as f64) < 0.9 * trained_bytes as f64,
        "frozen towers kept {frozen_bytes} bytes, trained towers {trained_bytes}"
    );
}
