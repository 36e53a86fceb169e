//! Model configs (presets, JSON round trip, validation) and the weight loader's errors for
//! missing and unexpected keys (mis-shaped keys: tests/model_parity.rs).

mod common;

use std::collections::BTreeMap;

use mcs_engine::model::weights::{save_safetensors, WeightStore};
use mcs_engine::model::{MedClipSeg, ModelConfig};
use mcs_engine::{Device, Tensor};

const WEIGHTS: &str = "tests/fixtures/tiny_weights.safetensors";

#[test]
fn presets_parse_and_describe_the_paper_model() {
    let paper = ModelConfig::unimedclip_vit_b16();
    assert_eq!((paper.image_size, paper.patch_size, paper.vision_width, paper.vision_heads), (224, 16, 768, 12));
    assert_eq!((paper.text_context_length, paper.adapter_dim, paper.beta, paper.gate_init), (256, 256, 2.35, 0.0));
    assert_eq!(paper.adapter_layers, (1..=10).collect::<Vec<_>>());
    assert_eq!((paper.vision_tokens(), paper.decoder_size()), (197, 56));
    let tiny = ModelConfig::tiny();
    assert_eq!(tiny.vision_layers, tiny.text_layers);
    assert!(ModelConfig::preset("huge").unwrap_err().to_string().contains("unknown model config `huge`"));
}

#[test]
fn config_round_trips_through_json() {
    let dir = std::env::temp_dir().join(format!("mcs-config-{}", std::process::id()));
    let path = dir.join("config.json");
    let config = ModelConfig::tiny();
    config.save(&path).unwrap();
    assert_eq!(ModelConfig::load(&path).unwrap(), config);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn invalid_configs_are_refused_with_the_reason() {
    let mut c = ModelConfig::tiny();
    c.vision_heads = 3;
    assert!(c.validate().unwrap_err().to_string().contains("vision_width 32 is not divisible by vision_heads 3"));
    let mut c = ModelConfig::tiny();
    c.adapter_layers = vec![0];
    assert!(c.validate().unwrap_err().to_string().contains("adapter layer 0"));
    let mut c = ModelConfig::tiny();
    c.text_layers = 3;
    assert!(c.validate().unwrap_err().to_string().contains("lock-step"));
}

fn tiny_tensors() -> BTreeMap<String, Tensor> {
    let store = WeightStore::load(&common::repo_file(WEIGHTS)).unwrap();
    let model = MedClipSeg::from_store(ModelConfig::tiny(), store, &Device::Cpu).unwrap();
    model.parameters().clone()
}

#[test]
fn a_missing_key_is_named_with_its_expected_shape() {
    let mut tensors = tiny_tensors();
    tensors.remove("upscale.1.conv2.weight");
    let store = WeightStore::from_tensors("test weights", tensors);
    let err = MedClipSeg::from_store(ModelConfig::tiny(), store, &Device::Cpu).err().unwrap().to_string();
    assert!(err.contains("missing key `upscale.1.conv2.weight`") && err.contains("[24, 1, 3, 3]"), "{err}");
}

#[test]
fn unexpected_keys_are_named() {
    let mut tensors = tiny_tensors();
    tensors.insert("pvl_adapters.7.proj_vis_down.0.weight".into(), Tensor::zeros(&[16, 32], &Device::Cpu).unwrap());
    let store = WeightStore::from_tensors("test weights", tensors);
    let err = MedClipSeg::from_store(ModelConfig::tiny(), store, &Device::Cpu).err().unwrap().to_string();
    assert!(err.contains("1 unexpected key(s)") && err.contains("pvl_adapters.7.proj_vis_down.0.weight"), "{err}");
}

#[test]
fn saved_weights_load_back_identically_and_never_leave_a_torn_file() {
    let tensors = tiny_tensors();
    let dir = std::env::temp_dir().join(format!("mcs-weights-{}", std::process::id()));
    let path = dir.join("model.safetensors");
    let named: Vec<(String, Tensor)> = tensors.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    save_safetensors(&path, &named, Default::default()).unwrap();
    let mut reloaded = WeightStore::load(&path).unwrap();
    for (key, t) in &tensors {
        let back = reloaded.take(key, t.shape(), &Device::Cpu).unwrap();
        assert_eq!(back.to_vec().unwrap(), t.to_vec().unwrap(), "{key}");
    }
    let leftovers: Vec<_> = std::fs::read_dir(&dir).unwrap().filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
    assert_eq!(leftovers.len(), 1, "temporary files left behind: {leftovers:?}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_file_that_is_not_safetensors_is_reported_by_name() {
    let dir = std::env::temp_dir().join(format!("mcs-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("broken.safetensors");
    std::fs::write(&path, b"definitely not a checkpoint").unwrap();
    let err = WeightStore::load(&path).err().unwrap().to_string();
    assert!(err.contains("broken.safetensors") && err.contains("not a readable safetensors file"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// A loaded model can be shared across threads by programs that embed the engine.
#[test]
fn model_and_tensors_can_be_shared_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<MedClipSeg>();
    assert_send_sync::<Tensor>();
    assert_send_sync::<Device>();
}

#[test]
fn a_non_finite_weight_is_refused_by_key() {
    let mut tensors = tiny_tensors();
    let mut values = vec![0.5f32; 24 * 24];
    values[7] = f32::NAN;
    tensors.insert("mask_head.2.weight".into(), Tensor::from_vec(values, &[24, 24]).unwrap());
    let store = WeightStore::from_tensors("test weights", tensors);
    let err = MedClipSeg::from_store(ModelConfig::tiny(), store, &Device::Cpu).err().unwrap().to_string();
    assert!(err.contains("`mask_head.2.weight` holds a non-finite value"), "{err}");
}
