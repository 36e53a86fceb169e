//! Training end to end on the tiny config and a small synthetic set: reproducibility across runs
//! and across a stop and `--resume`, checkpoints that load as model folders, a non-finite loss
//! that stops without losing the last checkpoint, and the atomic folder swap.

use std::path::{Path, PathBuf};

use mcs_engine::model::weights::WeightStore;
use mcs_engine::model::{MedClipSeg, ModelConfig};
use mcs_engine::tokenizer::preset_tokenizer_json;
use mcs_engine::train::checkpoint::{recover_folder, write_folder_atomically, STATE_FILE};
use mcs_engine::train::{self, load_model_folder, DataSpec, EpochRecord, Silent, TrainOptions, BEST, LATEST};
use mcs_engine::Device;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mcs-train-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Tiny model, 8 training and 4 validation images of 32 px, batches of 4 (two steps an epoch).
fn options(out: &Path, epochs: usize) -> TrainOptions {
    let mut config = ModelConfig::tiny();
    config.training.epochs = epochs;
    config.training.batch_size = 4;
    config.training.learning_rate = 1e-3;
    TrainOptions {
        config,
        tokenizer_json: preset_tokenizer_json("tiny").unwrap().to_vec(),
        initial_weights: None,
        data: DataSpec::Synthetic { train: 8, val: 4 },
        seed: 7,
        out: out.to_path_buf(),
        resume: false,
        device: Device::Cpu,
        workers: 2,
    }
}

/// The fields of a record that must reproduce bit for bit (timings may not).
fn numbers(records: &[EpochRecord]) -> Vec<[u32; 7]> {
    records
        .iter()
        .map(|r| [r.epoch as f32, r.learning_rate, r.loss, r.bce, r.dice, r.softcon, r.val_dice].map(f32::to_bits))
        .collect()
}

#[test]
fn same_seed_gives_identical_losses_across_runs_and_across_resume() {
    let (a, b, c) = (temp_dir("a"), temp_dir("b"), temp_dir("c"));
    let first = train::train(&options(&a, 3), &mut Silent).unwrap();
    let second = train::train(&options(&b, 3), &mut Silent).unwrap();
    assert_eq!(first.state.records.len(), 3);
    assert_eq!(numbers(&first.state.records), numbers(&second.state.records), "two runs with one seed differ");
    assert!(first.state.records.iter().all(|r| r.loss.is_finite() && (0.0..=1.0).contains(&r.val_dice)));
    // The run learns something: the training loss falls over the three epochs.
    assert!(first.state.records[2].loss < first.state.records[0].loss, "{:?}", first.state.records);

    // Stop after one epoch, then resume to three.
    let stopped = train::train(&options(&c, 1), &mut Silent).unwrap();
    assert_eq!(stopped.state.epochs_done, 1);
    let mut resume = options(&c, 3);
    resume.resume = true;
    let resumed = train::train(&resume, &mut Silent).unwrap();
    assert_eq!(resumed.state.steps, first.state.steps);
    assert_eq!(
        numbers(&resumed.state.records),
        numbers(&first.state.records),
        "a resumed run differs from an uninterrupted one"
    );

    // The outputs a user looks at.
    for file in [
        "metrics.csv",
        "curves.png",
        "latest/model.safetensors",
        "best/model.safetensors",
        "latest/optimizer.safetensors",
    ] {
        assert!(a.join(file).is_file(), "{file} missing");
    }
    let csv = std::fs::read_to_string(a.join("metrics.csv")).unwrap();
    assert_eq!(csv.lines().count(), 4, "header + 3 epochs:\n{csv}");
    for dir in [a, b, c] {
        std::fs::remove_dir_all(dir).unwrap();
    }
}

#[test]
fn a_checkpoint_is_a_model_folder_with_the_trained_weights() {
    let out = temp_dir("folder");
    let report = train::train(&options(&out, 1), &mut Silent).unwrap();
    let folder = load_model_folder(&out.join(LATEST), &Device::Cpu).unwrap();
    assert_eq!(folder.config.name, "tiny");
    // Weights moved away from their random start, and the folder holds exactly what training had.
    let start = MedClipSeg::from_store(folder.config.clone(), WeightStore::synthetic(7), &Device::Cpu).unwrap();
    let key = "mask_head.0.weight";
    let trained = folder.model.parameters()[key].to_vec().unwrap();
    assert_ne!(trained, start.parameters()[key].to_vec().unwrap(), "{key} did not change in training");
    let best = load_model_folder(&out.join(BEST), &Device::Cpu).unwrap();
    assert_eq!(report.state.best_epoch, 1);
    assert_eq!(best.model.parameters()[key].to_vec().unwrap(), trained);
    // A frozen tower weight is saved untouched.
    let frozen = "vision_model.conv1.weight";
    assert_eq!(folder.model.parameters()[frozen].to_vec().unwrap(), start.parameters()[frozen].to_vec().unwrap());
    std::fs::remove_dir_all(out).unwrap();
}

#[test]
fn a_non_finite_loss_stops_with_an_error_and_keeps_the_last_checkpoint() {
    let out = temp_dir("nan");
    train::train(&options(&out, 1), &mut Silent).unwrap();
    let saved_state = std::fs::read(out.join(LATEST).join(STATE_FILE)).unwrap();
    // A learning rate of 1e30 throws every trainable weight to ~1e30 on the first step of epoch 2,
    // so the second step's loss overflows.
    let mut bad = options(&out, 2);
    bad.resume = true;
    bad.config.training.learning_rate = 1e30;
    bad.config.training.min_learning_rate = 1e30;
    let err = train::train(&bad, &mut Silent).err().expect("training on a 1e30 learning rate must fail").to_string();
    assert!(err.contains("non-finite"), "{err}");
    assert!(err.contains("epoch 2"), "the error should say where: {err}");
    assert_eq!(
        std::fs::read(out.join(LATEST).join(STATE_FILE)).unwrap(),
        saved_state,
        "the last good checkpoint changed"
    );
    assert!(load_model_folder(&out.join(LATEST), &Device::Cpu).is_ok());
    std::fs::remove_dir_all(out).unwrap();
}

#[test]
fn starting_over_an_existing_run_needs_resume() {
    let out = temp_dir("twice");
    train::train(&options(&out, 1), &mut Silent).unwrap();
    let err = train::train(&options(&out, 1), &mut Silent).err().unwrap().to_string();
    assert!(err.contains("--resume"), "{err}");
    let mut other_seed = options(&out, 2);
    other_seed.resume = true;
    other_seed.seed = 8;
    let err = train::train(&other_seed, &mut Silent).err().unwrap().to_string();
    assert!(err.contains("seed 7"), "{err}");
    std::fs::remove_dir_all(out).unwrap();
}

#[test]
fn an_interrupted_folder_swap_is_repaired_on_read() {
    let root = temp_dir("swap");
    let dest = root.join("latest");
    write_folder_atomically(&dest, |tmp| std::fs::write(tmp.join("x"), b"one").map_err(mcs_engine::Error::io(tmp)))
        .unwrap();
    write_folder_atomically(&dest, |tmp| std::fs::write(tmp.join("x"), b"two").map_err(mcs_engine::Error::io(tmp)))
        .unwrap();
    assert_eq!(std::fs::read(dest.join("x")).unwrap(), b"two");
    // A save killed half-way leaves a partial folder behind: the next save removes it.
    std::fs::create_dir(root.join(".latest.partial-999999")).unwrap();
    write_folder_atomically(&dest, |tmp| std::fs::write(tmp.join("x"), b"two").map_err(mcs_engine::Error::io(tmp)))
        .unwrap();
    assert!(!root.join(".latest.partial-999999").exists(), "a stale partial folder was left");
    // A failing writer leaves the previous version in place.
    let failed = write_folder_atomically(&dest, |_| Err(mcs_engine::Error::Invalid("disk full".into())));
    assert!(failed.is_err());
    assert_eq!(std::fs::read(dest.join("x")).unwrap(), b"two");
    // A crash between the two renames of a swap: only the retired copy exists.
    std::fs::rename(&dest, root.join(".latest.previous")).unwrap();
    assert_eq!(recover_folder(&dest).unwrap(), dest);
    assert_eq!(std::fs::read(dest.join("x")).unwrap(), b"two");
    std::fs::remove_dir_all(root).unwrap();
}
