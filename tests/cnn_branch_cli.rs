//! The CNN branch end to end through the command line: `train --cnn-branch` on a small synthetic
//! dataset writes checkpoints that carry the branch (keys, config, updated batch-norm running
//! statistics), `--freeze-vlm` leaves MedCLIPSeg's weights as they started, and `predict` and
//! `eval` run on such a checkpoint (Monte-Carlo maps included). Misuse of the flags is refused.

#[path = "common/cli.rs"]
mod cli;
mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use cli::{run, s};
use mcs_engine::model::weights::WeightStore;
use mcs_engine::train::load_model_folder;
use mcs_engine::Device;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mcs-cnn-branch-{}", std::process::id())).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

const SEED: &str = "5";

/// Synthetic data (96 px images: 6 train, 3 val, 3 test) and the `tiny` model (32 px, so the
/// debug build of CI trains it in seconds) with a narrow branch (width 0.125: 8 ... 155
/// channels) trained for two epochs, jointly and with the VLM frozen.
struct Fixture {
    data: PathBuf,
    joint: PathBuf,
    frozen: PathBuf,
}

fn train(data: &Path, out: &Path, extra: &[&str]) {
    let mut args = vec![
        "train",
        "--data",
        s(data),
        "--config",
        "tiny",
        "--epochs",
        "2",
        "--batch-size",
        "3",
        "--seed",
        SEED,
        "--cnn-branch",
        "--cnn-width",
        "0.125",
        "--out",
        s(out),
    ];
    args.extend(extra);
    let outcome = run(&args);
    assert_eq!(outcome.code, Some(0), "train {extra:?} failed: {}", outcome.stderr);
    assert!(outcome.stderr.contains("with the CNN branch (width 0.125"), "{}", outcome.stderr);
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let root = scratch("fixture");
        let data = root.join("data");
        let synth = run(&["synth", "--out", s(&data), "--train", "6", "--val", "3", "--test", "3"]);
        assert_eq!(synth.code, Some(0), "synth failed: {}", synth.stderr);
        let (joint, frozen) = (root.join("joint"), root.join("frozen"));
        train(&data, &joint, &[]);
        train(&data, &frozen, &["--freeze-vlm"]);
        Fixture { data, joint: joint.join("latest"), frozen: frozen.join("latest") }
    })
}

#[test]
fn checkpoints_carry_the_branch_and_its_running_statistics() {
    let folder = load_model_folder(&fixture().joint, &Device::Cpu).unwrap();
    let cnn = folder.config.cnn_branch.as_ref().expect("the saved config has the branch");
    assert_eq!(cnn.width, 0.125);
    let params = folder.model.parameters();
    for key in
        ["cnn.conv11.weight", "cnn.eca4.conv.weight", "cnn.upconv4.weight", "cnn.outconv2.weight", "cnn.reduce.weight"]
    {
        assert!(params.contains_key(key), "checkpoint lacks {key}");
    }
    // Running statistics start at mean 0 and variance 1; four steps of momentum 0.1 on real
    // batches move them.
    let mean = params["cnn.bn1.running_mean"].to_vec().unwrap();
    let var = params["cnn.bn1.running_var"].to_vec().unwrap();
    assert!(mean.iter().any(|&m| m.abs() > 1e-4), "running means never moved: {mean:?}");
    assert!(var.iter().any(|&v| (v - 1.0).abs() > 1e-4), "running variances never moved: {var:?}");
    assert!(!params["cnn.bn1.running_mean"].needs_grad(), "running statistics are not trained");
    // Jointly trained: the branch and the config's own trainable parts (tiny: adapters and decoder).
    let trained: Vec<&String> = folder.model.trainable_parameters().map(|(k, _)| k).collect();
    assert!(trained.iter().any(|k| k.starts_with("cnn.")) && trained.iter().any(|k| k.starts_with("mask_head")));
}

#[test]
fn freeze_vlm_trains_only_the_branch() {
    let folder = load_model_folder(&fixture().frozen, &Device::Cpu).unwrap();
    assert!(folder.model.trainable_parameters().all(|(k, _)| k.starts_with("cnn.")));
    // The towers, adapters and decoder are still the seeded random start.
    let seed: u64 = SEED.parse().unwrap();
    let mut start = WeightStore::synthetic(seed);
    let mut compared = 0;
    for (key, value) in folder.model.parameters().iter().filter(|(k, _)| !k.starts_with("cnn.")) {
        let initial = start.take(key, value.shape(), &Device::Cpu).unwrap();
        assert_eq!(value.to_vec().unwrap(), initial.to_vec().unwrap(), "{key} changed under --freeze-vlm");
        compared += 1;
    }
    assert!(compared > 50, "compared {compared} frozen tensors");
    // ...while the branch moved away from its own start.
    let key = "cnn.conv11.weight";
    let value = &folder.model.parameters()[key];
    let initial = start.take(key, value.shape(), &Device::Cpu).unwrap();
    assert_ne!(value.to_vec().unwrap(), initial.to_vec().unwrap(), "{key} did not train");
}

#[test]
fn predict_and_eval_run_on_a_branch_checkpoint() {
    let dir = scratch("predict");
    let image = fixture().data.join("Test_Folder/img");
    let image = std::fs::read_dir(&image).unwrap().next().unwrap().unwrap().path();
    let out = run(&[
        "predict",
        "--model",
        s(&fixture().joint),
        "--image",
        s(&image),
        "--prompt",
        "one small lesion",
        "--samples",
        "3",
        "--out",
        s(&dir),
    ]);
    assert_eq!(out.code, Some(0), "predict failed: {}", out.stderr);
    for file in ["mask.png", "probability.npy", "uncertainty.npy", "overlay.png"] {
        assert!(dir.join(file).is_file(), "predict did not write {file}: {:?}", std::fs::read_dir(&dir).unwrap());
    }
    let ((_, _), uncertainty) = common::read_npy(&dir.join("uncertainty.npy"));
    assert!(uncertainty.iter().all(|u| u.is_finite() && *u >= 0.0));

    let eval_dir = scratch("eval");
    let json = eval_dir.join("summary.json");
    let out = run(&[
        "eval",
        "--model",
        s(&fixture().joint),
        "--data",
        s(&fixture().data),
        "--split",
        "Val",
        "--samples",
        "2",
        "--out",
        s(&eval_dir),
        "--json",
        s(&json),
    ]);
    assert_eq!(out.code, Some(0), "eval failed: {}", out.stderr);
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let dice = summary[0]["dice"].as_f64().expect("summary has the Dice");
    let ece = summary[0]["ece"].as_f64().expect("summary has the ECE");
    assert!((0.0..=1.0).contains(&ece), "ECE {ece}");
    assert!((0.0..=1.0).contains(&dice), "Dice {dice}");
}

#[test]
fn a_resume_must_keep_the_branch() {
    let run_dir = fixture().frozen.parent().unwrap();
    let checkpoint = std::fs::read(run_dir.join("latest/model.safetensors")).unwrap();
    for dropped in [&["--cnn-branch", "--cnn-width", "0.125"][..], &["--freeze-vlm"]] {
        let mut args = vec!["train", "--data", s(&fixture().data), "--config", "tiny", "--epochs", "3"];
        args.extend(["--batch-size", "3", "--seed", SEED, "--out", s(run_dir), "--resume"]);
        // The frozen run was trained with both; leave one out.
        let kept: Vec<&str> =
            if dropped[0] == "--freeze-vlm" { vec!["--cnn-branch", "--cnn-width", "0.125"] } else { vec![] };
        args.extend(kept);
        let out = run(&args);
        assert_eq!(out.code, Some(1), "resuming without {dropped:?}: {}", out.stderr);
        let named = if dropped[0] == "--freeze-vlm" { "config trainable" } else { "config cnn_branch" };
        assert!(out.stderr.contains(named), "resuming without {dropped:?}: {}", out.stderr);
    }
    assert_eq!(std::fs::read(run_dir.join("latest/model.safetensors")).unwrap(), checkpoint, "a refused resume wrote");
}

#[test]
fn branch_flags_without_the_branch_are_refused() {
    for flag in [&["--freeze-vlm"][..], &["--cnn-width", "0.5"], &["--cnn-repeat-decoder-conv"]] {
        let mut args = vec!["train", "--epochs", "1"];
        args.extend(flag);
        let out = run(&args);
        assert_eq!(out.code, Some(2), "{flag:?} without --cnn-branch: {}", out.stderr);
        assert!(out.stderr.contains("--cnn-branch"), "{flag:?}: {}", out.stderr);
    }
    // A width of zero is refused by the parser, before anything runs.
    let out = run(&["train", "--config", "tiny", "--cnn-branch", "--cnn-width", "0"]);
    assert_eq!(out.code, Some(2), "{}", out.stderr);
}
