//! The towers on their own (src/model/clip.rs): the image embedding is the same whichever block
//! the vision tower is split at, the text embedding does not depend on the other prompts of the
//! batch, and GPU agrees with CPU.

mod common;

use common::{assert_close, devices, gpu, random_tensor};
use mcs_engine::model::weights::WeightStore;
use mcs_engine::model::{MedClipSeg, ModelConfig};
use mcs_engine::{Device, Tape};

const WEIGHTS: &str = "tests/fixtures/tiny_weights.safetensors";

fn model(device: &Device) -> MedClipSeg {
    MedClipSeg::from_store(ModelConfig::tiny(), WeightStore::load(&common::repo_file(WEIGHTS)).unwrap(), device)
        .unwrap()
}

fn ids(prompts: &[&[u32]], context: usize) -> Vec<u32> {
    let mut all = Vec::new();
    for p in prompts {
        let mut row = p.to_vec();
        row.resize(context, 0);
        all.extend(row);
    }
    all
}

#[test]
fn the_image_embedding_does_not_depend_on_where_the_tower_is_split() {
    for device in devices() {
        let model = model(&device);
        let tape = Tape::inference();
        let pixels = random_tensor(1, &[2, 3, 32, 32], -2.0, 2.0, &device);
        let whole = model.image_embedding(&tape, &pixels).unwrap();
        assert_eq!(whole.shape(), [2, 24]);
        for split in 0..=4 {
            let tokens = model.vision_tokens_after(&tape, &pixels, split).unwrap();
            let embedding = model.image_embedding_from(&tape, &tokens, split).unwrap();
            // The same ops in the same order: bit for bit.
            assert_eq!(embedding.to_vec().unwrap(), whole.to_vec().unwrap(), "split at {split}");
        }
        assert!(model.vision_tokens_after(&tape, &pixels, 5).is_err());
        let wrong = random_tensor(2, &[1, 3, 16, 16], -1.0, 1.0, &device);
        assert!(model.image_embedding(&tape, &wrong).unwrap_err().to_string().contains("[B, 3, 32, 32]"));
    }
}

#[test]
fn text_embeddings_are_per_prompt() {
    let model = model(&Device::Cpu);
    let tape = Tape::inference();
    let (a, b): (&[u32], &[u32]) = (&[2, 10, 11, 12, 3], &[2, 20, 3]);
    let pair = model.text_embedding(&tape, &ids(&[a, b], 16)).unwrap().to_vec().unwrap();
    let alone = model.text_embedding(&tape, &ids(&[b], 16)).unwrap().to_vec().unwrap();
    // Row 1 of the pair is prompt b: a batch row never sees the other rows (up to GEMM blocking).
    assert_close("prompt b", &pair[24..], &alone, 1e-5, 1e-5);
    assert_ne!(pair[..24], pair[24..]);
    assert!(model.text_embedding(&tape, &[2, 3]).is_err(), "2 ids are not a 16-token prompt");
}

#[test]
fn gpu_embeddings_match_cpu() {
    let Some(gpu) = gpu() else { return };
    let (cpu_model, gpu_model) = (model(&Device::Cpu), model(&gpu));
    let tape = Tape::inference();
    let pixels = random_tensor(3, &[2, 3, 32, 32], -2.0, 2.0, &Device::Cpu);
    let want = cpu_model.image_embedding(&tape, &pixels).unwrap().to_vec().unwrap();
    let got = gpu_model.image_embedding(&tape, &pixels.to_device(&gpu).unwrap()).unwrap().to_vec().unwrap();
    // Four blocks of FP32 with other summation orders (the parity budget of tests/model_parity.rs).
    assert_close("image embedding", &got, &want, 1e-4, 1e-4);
    let prompt = ids(&[&[2, 10, 11, 3], &[2, 30, 3]], 16);
    let want = cpu_model.text_embedding(&tape, &prompt).unwrap().to_vec().unwrap();
    let got = gpu_model.text_embedding(&tape, &prompt).unwrap().to_vec().unwrap();
    assert_close("text embedding", &got, &want, 1e-4, 1e-4);
}
