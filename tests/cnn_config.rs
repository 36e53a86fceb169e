//! The CNN branch's configuration and loading: the paper's channel counts and ECA kernel, the
//! width factor, refusals of unusable settings, the parameter count the memory check relies on,
//! keys and shapes named in loading errors, a branch started from random weights beside a file
//! without it, and the running-statistics update refusing keys the model does not hold.

mod common;

use std::collections::BTreeMap;

use mcs_engine::model::config::unet_d;
use mcs_engine::model::weights::WeightStore;
use mcs_engine::model::{CnnBranchConfig, MedClipSeg, ModelConfig};
use mcs_engine::{Device, Tensor};

const WEIGHTS: &str = "tests/fixtures/tiny_weights.safetensors";

fn with_branch(mut config: ModelConfig, width: f64) -> ModelConfig {
    config.add_cnn_branch(Some(width), false);
    config
}

#[test]
fn channel_counts_and_eca_kernel_follow_the_paper() {
    let paper = CnnBranchConfig::default();
    assert_eq!(unet_d::ENCODER.map(|c| paper.channels(c)), [64, 128, 256, 512]);
    assert_eq!(paper.channels(unet_d::BOTTLENECK), 1240);
    // ECA-Net's rule gives 5 for the paper's 1240 channels (log2 1240 = 10.28).
    assert_eq!(CnnBranchConfig::eca_kernel(1240), 5);
    assert_eq!(CnnBranchConfig::eca_kernel(64), 3);
    assert_eq!(CnnBranchConfig::eca_kernel(2), 1);
    let narrow = CnnBranchConfig { width: 0.125, ..CnnBranchConfig::default() };
    assert_eq!(unet_d::DECODER.map(|c| narrow.channels(c)), [68, 23, 11, 6]);
    assert_eq!(CnnBranchConfig { width: 0.001, ..CnnBranchConfig::default() }.channels(45), 1);
    // Three quarters of the depth, rounded up.
    assert_eq!(paper.resolved_vision_layer(12), 9);
    assert_eq!(paper.resolved_vision_layer(4), 3);
    assert_eq!(CnnBranchConfig { vision_layer: 2, ..paper }.resolved_vision_layer(12), 2);
}

#[test]
fn unusable_branch_settings_are_refused_with_the_reason() {
    let refused = |config: ModelConfig, needle: &str| {
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains(needle), "expected `{needle}` in: {err}");
    };
    let mut c = with_branch(ModelConfig::tiny(), 1.0);
    c.image_size = 40;
    c.patch_size = 8;
    refused(c, "image_size 40 must be a multiple of 16");
    refused(with_branch(ModelConfig::tiny(), 0.0), "cnn_branch.width 0 is outside (0, 4]");
    refused(with_branch(ModelConfig::tiny(), f64::NAN), "cnn_branch.width NaN");
    let mut c = with_branch(ModelConfig::tiny(), 1.0);
    c.cnn_branch.as_mut().unwrap().vision_layer = 5;
    refused(c, "cnn_branch.vision_layer 5 is outside 1..=4");
    let mut c = with_branch(ModelConfig::tiny(), 1.0);
    c.cnn_branch.as_mut().unwrap().dropout = 1.0;
    refused(c, "cnn_branch.dropout 1 is outside [0, 1)");
    let mut c = with_branch(ModelConfig::tiny(), 1.0);
    c.cnn_branch.as_mut().unwrap().bn_momentum = 0.0;
    refused(c, "bn_momentum 0 is outside (0, 1]");
}

#[test]
fn a_config_with_the_branch_round_trips_and_one_without_stays_without() {
    let dir = std::env::temp_dir().join(format!("mcs-cnn-config-{}", std::process::id()));
    let path = dir.join("config.json");
    let config = with_branch(ModelConfig::preset("small").unwrap(), 0.25);
    config.save(&path).unwrap();
    assert_eq!(ModelConfig::load(&path).unwrap(), config);
    ModelConfig::tiny().save(&path).unwrap();
    assert!(!std::fs::read_to_string(&path).unwrap().contains("cnn_branch"), "no branch, no entry");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn freeze_vlm_trains_only_the_branch() {
    let mut frozen = ModelConfig::tiny();
    frozen.add_cnn_branch(None, true);
    assert_eq!(frozen.trainable, ["cnn."]);
    let joint = with_branch(ModelConfig::tiny(), 1.0);
    assert!(
        joint.trainable.len() > 1 && joint.is_trainable("cnn.conv11.weight") && joint.is_trainable("mask_head.0.bias")
    );
}

#[test]
fn the_parameter_count_is_what_the_model_loads() {
    for (config, width) in [
        (ModelConfig::tiny(), 0.125),
        (ModelConfig::preset("small").unwrap(), 0.25),
        (ModelConfig::preset("small").unwrap(), 1.0),
    ] {
        let config = with_branch(config, width);
        let model = MedClipSeg::from_store(config.clone(), WeightStore::synthetic(3), &Device::Cpu).unwrap();
        let loaded: usize = model.parameters().values().map(Tensor::numel).sum();
        assert_eq!(config.parameter_count(), Some(loaded as u64), "{} at width {width}", config.name);
        let branch: usize =
            model.parameters().iter().filter(|(k, _)| k.starts_with("cnn.")).map(|(_, t)| t.numel()).sum();
        assert!(branch > 0);
    }
}

#[test]
fn the_branch_does_not_count_per_monte_carlo_sample() {
    // It runs once per image whatever the number of samples, so the samples a pass may stack
    // (limits::max_samples) stay those of the model without it.
    for config in [ModelConfig::preset("small").unwrap(), ModelConfig::unimedclip_vit_b16()] {
        let plain = config.sample_activation_elements();
        assert_eq!(with_branch(config, 1.0).sample_activation_elements(), plain);
    }
}

#[test]
fn synthetic_running_statistics_start_as_pytorch_does() {
    let model =
        MedClipSeg::from_store(with_branch(ModelConfig::tiny(), 0.125), WeightStore::synthetic(1), &Device::Cpu)
            .unwrap();
    let p = model.parameters();
    assert!(p["cnn.bn3.running_mean"].to_vec().unwrap().iter().all(|&v| v == 0.0));
    assert!(p["cnn.upbn1.running_var"].to_vec().unwrap().iter().all(|&v| v == 1.0));
    assert!(p["cnn.bn1.weight"].to_vec().unwrap().iter().all(|&v| v == 1.0));
}

fn tiny_tensors() -> BTreeMap<String, Tensor> {
    WeightStore::load(&common::repo_file(WEIGHTS)).unwrap().into_tensors()
}

#[test]
fn a_file_without_the_branch_names_the_first_missing_key_unless_the_branch_starts_random() {
    let config = with_branch(ModelConfig::tiny(), 0.125);
    let store = WeightStore::from_tensors("tiny weights", tiny_tensors());
    let err = MedClipSeg::from_store(config.clone(), store, &Device::Cpu).err().unwrap().to_string();
    assert!(err.contains("missing key `cnn.") && err.contains("expected shape"), "{err}");

    // With the branch started from random weights the rest still comes from the file.
    let store = WeightStore::from_tensors("tiny weights", tiny_tensors()).with_random_part("cnn.", 4);
    let model = MedClipSeg::from_store(config.clone(), store, &Device::Cpu).unwrap();
    let want = &tiny_tensors()["mask_head.0.weight"];
    assert_eq!(model.parameters()["mask_head.0.weight"].to_vec().unwrap(), want.to_vec().unwrap());
    // ...and only the branch: a missing key outside it is still an error.
    let mut tensors = tiny_tensors();
    tensors.remove("mask_head.0.weight");
    let store = WeightStore::from_tensors("tiny weights", tensors).with_random_part("cnn.", 4);
    let err = MedClipSeg::from_store(config, store, &Device::Cpu).err().unwrap().to_string();
    assert!(err.contains("missing key `mask_head.0.weight`"), "{err}");
}

#[test]
fn a_mis_shaped_branch_weight_is_named_with_both_shapes() {
    let config = with_branch(ModelConfig::tiny(), 0.125);
    let mut tensors = tiny_tensors();
    tensors.insert("cnn.eca4.conv.weight".into(), Tensor::zeros(&[1, 1, 3], &Device::Cpu).unwrap());
    let store = WeightStore::from_tensors("branch weights", tensors).with_random_part("cnn.", 4);
    let err = MedClipSeg::from_store(config, store, &Device::Cpu).err().unwrap().to_string();
    assert!(err.contains("`cnn.eca4.conv.weight` has shape [1, 1, 3], expected [1, 1, 5]"), "{err}");
}

#[test]
fn running_statistics_updates_must_name_a_running_statistic() {
    let config = with_branch(ModelConfig::tiny(), 0.125);
    let mut model = MedClipSeg::from_store(config, WeightStore::synthetic(2), &Device::Cpu).unwrap();
    let cpu = Device::Cpu;
    let unknown = vec![("cnn.bn9.running_mean".to_string(), Tensor::zeros(&[8], &cpu).unwrap())];
    assert!(model.set_running_statistics(unknown).unwrap_err().to_string().contains("cnn.bn9.running_mean"));
    // A trained parameter is not a running statistic.
    let trained = vec![("cnn.bn1.weight".to_string(), Tensor::zeros(&[8], &cpu).unwrap())];
    assert!(model.set_running_statistics(trained).is_err());
    let wrong = vec![("cnn.bn1.running_var".to_string(), Tensor::zeros(&[9], &cpu).unwrap())];
    assert!(model.set_running_statistics(wrong).unwrap_err().to_string().contains("[9]"));
    let good = vec![("cnn.bn1.running_var".to_string(), Tensor::full(2.0, &[8], &cpu).unwrap())];
    model.set_running_statistics(good).unwrap();
    assert_eq!(model.parameters()["cnn.bn1.running_var"].to_vec().unwrap(), vec![2.0; 8]);
}
