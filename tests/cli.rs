//! The `mcs-engine` binary end to end: the default `predict` (the demo checkpoint on the built-in
//! picture) writes its three maps, `--config` alone still runs random weights, and bad input ends
//! in a one-line error and a non-zero exit, never a panic.

use std::process::Command;

/// The binary under test: `MCS_ENGINE_BIN` when set (a packed GPU kit, where cargo's
/// compile-time path does not exist), else the one cargo built.
fn binary() -> std::path::PathBuf {
    std::env::var_os("MCS_ENGINE_BIN").map_or_else(|| env!("CARGO_BIN_EXE_mcs-engine").into(), Into::into)
}

fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(binary()).args(args).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn default_predict_writes_mask_probability_and_uncertainty() {
    let dir = std::env::temp_dir().join(format!("mcs-cli-{}", std::process::id()));
    let (ok, stdout, stderr) = run(&["predict", "--samples", "4", "--out", dir.to_str().unwrap()]);
    assert!(ok, "predict failed: {stderr}");
    assert!(stdout.contains("4 samples on "), "{stdout}");
    // No model named: the demo checkpoint, not random weights.
    assert!(stderr.contains("weights/demo") && !stderr.contains("random weights"), "{stderr}");
    for name in ["mask.png", "probability.png", "uncertainty.png"] {
        let bytes = std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(&bytes[1..4], b"PNG", "{name} is not a PNG");
    }
    // Same seed, same maps: the sampling noise is counter-based.
    let first = std::fs::read(dir.join("uncertainty.png")).unwrap();
    assert!(run(&["predict", "--samples", "4", "--out", dir.to_str().unwrap()]).0);
    assert_eq!(std::fs::read(dir.join("uncertainty.png")).unwrap(), first);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn config_without_model_or_weights_still_runs_random_weights() {
    let dir = std::env::temp_dir().join(format!("mcs-cli-random-{}", std::process::id()));
    let (ok, stdout, stderr) = run(&["predict", "--config", "tiny", "--samples", "2", "--out", dir.to_str().unwrap()]);
    assert!(ok, "predict --config tiny failed: {stderr}");
    assert!(stdout.contains("2 samples on ") && stderr.contains("random weights"), "{stdout}{stderr}");
    assert!(!stderr.contains("demo checkpoint"), "{stderr}");
    assert!(dir.join("mask.png").is_file());
    // --model and --config name two models: clap refuses the pair.
    let (ok, _, stderr) = run(&["predict", "--model", "weights/demo", "--config", "tiny"]);
    assert!(!ok && stderr.contains("cannot be used with"), "{stderr}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// A small valid PNG in the temp folder (the kit run on the GPU machine has no docs/ folder).
fn readable_png() -> String {
    let path = std::env::temp_dir().join(format!("mcs-cli-readable-{}.png", std::process::id()));
    image::RgbImage::new(8, 8).save(&path).unwrap();
    path.to_string_lossy().into_owned()
}

#[test]
fn bad_input_gives_a_named_error_and_a_failing_exit() {
    let cases: [(&[&str], &str); 5] = [
        (&["predict", "--image", "no/such/image.png"], "no/such/image.png"),
        (&["predict", "--image", &readable_png()], "--prompt"),
        (&["predict", "--prompt", "  "], "empty prompt"),
        (&["predict", "--samples", "0"], "at least 1"),
        (&["predict", "--config", "no-such-config"], "unknown model config `no-such-config`"),
    ];
    for (args, expected) in cases {
        let (ok, _, stderr) = run(args);
        assert!(!ok, "{args:?} succeeded");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    }
}

#[test]
fn noise_mode_flag_is_accepted_and_bad_values_are_named() {
    let dir = std::env::temp_dir().join(format!("mcs-cli-noise-{}", std::process::id()));
    let out = dir.to_str().unwrap();
    let (ok, stdout, stderr) = run(&["predict", "--samples", "4", "--noise", "antithetic", "--out", out]);
    assert!(ok && stdout.contains("4 samples on "), "predict --noise antithetic failed: {stderr}");
    let antithetic = std::fs::read(dir.join("probability.png")).unwrap();
    assert!(run(&["predict", "--samples", "4", "--noise", "plain", "--out", out]).0);
    assert_ne!(std::fs::read(dir.join("probability.png")).unwrap(), antithetic, "--noise changed nothing");
    std::fs::remove_dir_all(&dir).unwrap();
    for command in ["predict", "eval"] {
        let (ok, _, stderr) = run(&[command, "--data", "unused", "--noise", "sobol"]);
        assert!(!ok, "{command} accepted --noise sobol");
        assert!(stderr.contains("sobol") && stderr.contains("plain") && stderr.contains("antithetic"), "{stderr}");
        assert!(!stderr.contains("panicked"), "{command} panicked: {stderr}");
    }
    let (ok, help, _) = run(&["predict", "--help"]);
    assert!(ok && help.contains("--noise") && help.contains("antithetic"), "{help}");
}

/// `--fast` is the library's `Options::fast()`: the same files as `--noise antithetic --samples 8`,
/// byte for byte, and it cannot be combined with the flags it sets.
#[test]
fn fast_is_eight_antithetic_samples_and_refuses_the_flags_it_sets() {
    let dir = std::env::temp_dir().join(format!("mcs-cli-fast-{}", std::process::id()));
    let (fast, spelled) = (dir.join("fast"), dir.join("spelled"));
    let (ok, stdout, stderr) = run(&["predict", "--fast", "--out", fast.to_str().unwrap()]);
    assert!(ok && stdout.contains(&format!("{} samples on ", mcs_engine::segment::FAST_SAMPLES)), "{stdout}{stderr}");
    let samples = mcs_engine::segment::FAST_SAMPLES.to_string();
    let spelled_args = ["predict", "--noise", "antithetic", "--samples", &samples, "--out", spelled.to_str().unwrap()];
    assert!(run(&spelled_args).0);
    for file in ["probability.npy", "uncertainty.npy", "mask.png"] {
        assert_eq!(std::fs::read(fast.join(file)).unwrap(), std::fs::read(spelled.join(file)).unwrap(), "{file}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
    for flags in [&["--fast", "--samples", "30"][..], &["--fast", "--noise", "plain"][..]] {
        let (ok, _, stderr) = run(&[&["predict"][..], flags].concat());
        assert!(!ok && stderr.contains("--fast") && stderr.contains("cannot be used with"), "{flags:?}: {stderr}");
    }
}

#[test]
fn a_corrupt_image_is_named() {
    let path = std::env::temp_dir().join(format!("mcs-corrupt-{}.png", std::process::id()));
    std::fs::write(&path, b"\x89PNG\r\n\x1a\nthis is not really a png").unwrap();
    let (ok, _, stderr) = run(&["predict", "--image", path.to_str().unwrap()]);
    std::fs::remove_file(&path).unwrap();
    let name = path.file_name().unwrap().to_str().unwrap();
    assert!(!ok && stderr.contains(name) && stderr.contains("not a readable"), "{stderr}");
}

#[test]
fn synth_then_train_on_its_folder_writes_checkpoints_and_metrics() {
    let root = std::env::temp_dir().join(format!("mcs-cli-train-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let (data, out) = (root.join("data"), root.join("run"));
    let (ok, _, stderr) = run(&["synth", "--out", data.to_str().unwrap(), "--train", "6", "--val", "3", "--test", "2"]);
    assert!(ok, "synth failed: {stderr}");
    for file in
        ["Prompts_Folder/Train_text.xlsx", "Prompts_Folder/Val_text_50.xlsx", "Train_Folder/img", "Test_Folder/label"]
    {
        assert!(data.join(file).exists(), "synth did not write {file}");
    }
    let train = ["train", "--data", data.to_str().unwrap(), "--config", "tiny", "--batch-size", "3"];
    let with_out = |extra: &[&str]| -> Vec<String> {
        train.iter().chain(["--out", out.to_str().unwrap()].iter()).chain(extra).map(|s| s.to_string()).collect()
    };
    let args = with_out(&["--epochs", "1"]);
    let (ok, stdout, stderr) = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "train failed: {stderr}");
    assert!(stdout.contains("best validation Dice") && stdout.contains("text ablation"), "{stdout}");
    for file in [
        "latest/model.safetensors",
        "latest/config.json",
        "latest/tokenizer.json",
        "best/training_state.json",
        "metrics.csv",
        "curves.png",
    ] {
        assert!(out.join(file).is_file(), "train did not write {file}");
    }
    // The same command again would overwrite the run: it must ask for --resume instead.
    let (ok, _, stderr) = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!ok && stderr.contains("--resume") && !stderr.contains("panicked"), "{stderr}");
    // Resuming a finished run with more epochs continues it.
    let args = with_out(&["--resume", "--epochs", "2"]);
    let (ok, stdout, stderr) = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "resume failed: {stderr}");
    assert!(stdout.contains("2 epochs"), "{stdout}");
    std::fs::remove_dir_all(root).unwrap();
}

#[test]
fn train_on_bad_input_names_it_and_fails() {
    let missing = std::env::temp_dir().join("mcs-no-such-dataset");
    let out = std::env::temp_dir().join(format!("mcs-cli-bad-train-{}", std::process::id()));
    let cases: [(&[&str], &str); 3] = [
        (&["train", "--data", missing.to_str().unwrap(), "--out", out.to_str().unwrap()], "mcs-no-such-dataset"),
        (&["train", "--epochs", "0", "--out", out.to_str().unwrap()], "epoch"),
        (&["train", "--config", "no-such-config", "--out", out.to_str().unwrap()], "no-such-config"),
    ];
    for (args, needle) in cases {
        let (ok, _, stderr) = run(args);
        assert!(!ok, "{args:?} should fail");
        assert!(stderr.contains(needle) && !stderr.contains("panicked"), "{args:?}: {stderr}");
    }
    assert!(!out.join("latest").exists(), "a failed start left a checkpoint");
}

#[test]
fn predict_reads_a_model_folder_that_train_wrote() {
    let root = std::env::temp_dir().join(format!("mcs-cli-model-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let (data, run_dir, maps) = (root.join("data"), root.join("run"), root.join("maps"));
    assert!(run(&["synth", "--out", data.to_str().unwrap(), "--train", "4", "--val", "2", "--test", "1"]).0);
    let (ok, _, stderr) = run(&[
        "train",
        "--config",
        "tiny",
        "--epochs",
        "1",
        "--batch-size",
        "2",
        "--synthetic-train",
        "4",
        "--synthetic-val",
        "2",
        "--out",
        run_dir.to_str().unwrap(),
    ]);
    assert!(ok, "train failed: {stderr}");
    let image = data.join("Test_Folder/img").read_dir().unwrap().next().unwrap().unwrap().path();
    let model = run_dir.join("best");
    let (ok, stdout, stderr) = run(&[
        "predict",
        "--model",
        model.to_str().unwrap(),
        "--image",
        image.to_str().unwrap(),
        "--prompt",
        "one small round-shaped lesion at the center of the image",
        "--samples",
        "3",
        "--out",
        maps.to_str().unwrap(),
    ]);
    assert!(ok, "predict --model failed: {stderr}");
    assert!(stdout.contains("3 samples on ") && !stderr.contains("random weights"), "{stdout}{stderr}");
    // The maps come back at the input's own size (96 x 96), not the model's 32.
    let mask = image::open(maps.join("mask.png")).unwrap();
    assert_eq!((mask.width(), mask.height()), (96, 96));
    // A folder without its weights names the missing file.
    std::fs::remove_file(model.join("model.safetensors")).unwrap();
    let (ok, _, stderr) = run(&["predict", "--model", model.to_str().unwrap(), "--out", maps.to_str().unwrap()]);
    assert!(!ok && stderr.contains("model.safetensors"), "{stderr}");
    std::fs::remove_dir_all(root).unwrap();
}

/// A reader that goes away (`mcs-engine info | head -0`) ends the command quietly, not in a panic
/// on the broken pipe.
#[test]
fn a_closed_output_pipe_is_no_panic() {
    use std::process::Stdio;
    let mut child = Command::new(binary()).arg("info").stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    drop(child.stdout.take()); // closed before the child writes its first line
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
}
