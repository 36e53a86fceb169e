//! The demo checkpoint `weights/demo` (trained by the default `mcs-engine train`, see its
//! README.md): `eval` on the synthetic validation split, written to disk by `synth` from the
//! record of the run, reproduces the validation Dice the run recorded; `predict` with no
//! `--model` uses it and finds the lesion a prompt names.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use mcs_engine::data::synthetic;

/// The binary under test: `MCS_ENGINE_BIN` when set (a packed GPU kit), else cargo's.
fn binary() -> PathBuf {
    std::env::var_os("MCS_ENGINE_BIN").map_or_else(|| env!("CARGO_BIN_EXE_mcs-engine").into(), Into::into)
}

/// The repository root: `MCS_ROOT` when set (a GPU kit copied to another machine, see
/// tools/gpu_check.sh), else the source tree cargo built from.
fn repository() -> PathBuf {
    match std::env::var_os("MCS_ROOT") {
        Some(root) if !root.is_empty() => root.into(),
        _ => env!("CARGO_MANIFEST_DIR").into(),
    }
}

struct Outcome {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// Runs the binary in `cwd`.
fn run_in(cwd: &Path, args: &[&str]) -> Outcome {
    let out = Command::new(binary()).args(args).current_dir(cwd).output().unwrap();
    Outcome {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into(),
        stderr: String::from_utf8_lossy(&out.stderr).into(),
    }
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mcs-demo-{}", std::process::id())).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A JSON number field (the first one of that name) of `text`; a plain search keeps the tests
/// free of serde_json.
fn json_number(text: &str, key: &str) -> f64 {
    json_field(text, key).parse().unwrap_or_else(|e| panic!("{key}: {e}"))
}

fn json_field<'a>(text: &'a str, key: &str) -> &'a str {
    let after = text.split(&format!("\"{key}\":")).nth(1).unwrap_or_else(|| panic!("no {key} in {text}"));
    after.trim_start().split([',', '\n', '}']).next().unwrap().trim()
}

/// A JSON string field (without escapes) of `text`.
fn json_string<'a>(text: &'a str, key: &str) -> &'a str {
    let after = text.split(&format!("\"{key}\":")).nth(1).unwrap_or_else(|| panic!("no {key} in {text}"));
    after
        .trim_start()
        .strip_prefix('"')
        .and_then(|v| v.split('"').next())
        .unwrap_or_else(|| panic!("{key}: not a string"))
}

/// What the demo run recorded: its seed, the sizes of its synthetic splits, its image size and
/// the best epoch's validation Dice (the one `best/` holds).
struct Record {
    seed: u64,
    train: usize,
    val: usize,
    size: usize,
    batch_size: usize,
    best_val_dice: f64,
}

fn record() -> &'static Record {
    static RECORD: OnceLock<Record> = OnceLock::new();
    RECORD.get_or_init(|| {
        let demo = repository().join("weights/demo");
        let state = std::fs::read_to_string(demo.join("training_state.json")).unwrap();
        let config = std::fs::read_to_string(demo.join("config.json")).unwrap();
        // `"data": "synthetic (2000 train, 200 val)"`: the in-memory synthetic task of that size.
        let data = json_string(&state, "data");
        let counts: Vec<usize> = data
            .strip_prefix("synthetic (")
            .unwrap_or_else(|| panic!("the demo was not trained on the synthetic task: {data}"))
            .split(|c: char| !c.is_ascii_digit())
            .filter(|w| !w.is_empty())
            .map(|w| w.parse().unwrap())
            .collect();
        Record {
            seed: json_number(&state, "seed") as u64,
            train: counts[0],
            val: counts[1],
            size: json_number(&config, "image_size") as usize,
            batch_size: json_number(&config, "batch_size") as usize,
            best_val_dice: json_number(&state, "best_val_dice"),
        }
    })
}

/// The synthetic task on disk exactly as the demo run generated it in memory: `synth` with the
/// run's seed, image size and train count (the validation images are the ids after the training
/// ones) and its validation count; four test images, which the run never saw.
fn dataset() -> &'static Path {
    static DATA: OnceLock<PathBuf> = OnceLock::new();
    DATA.get_or_init(|| {
        let r = record();
        let data = scratch("data");
        let (seed, size, train, val) = (r.seed.to_string(), r.size.to_string(), r.train.to_string(), r.val.to_string());
        let args = [
            "synth",
            "--out",
            s(&data),
            "--seed",
            &seed,
            "--size",
            &size,
            "--train",
            &train,
            "--val",
            &val,
            "--test",
            "4",
        ];
        let out = run_in(&repository(), &args);
        assert!(out.ok, "synth failed: {}", out.stderr);
        data
    })
}

#[test]
fn eval_on_the_synthetic_validation_split_reproduces_the_recorded_validation_dice() {
    let r = record();
    assert_eq!((r.train, r.val, r.size, r.batch_size), (2000, 200, 96, 16), "the demo run is not the default one");
    let out_dir = scratch("eval");
    let json = out_dir.join("summary.json");
    let seed = r.seed.to_string();
    // Validation during training is one stochastic pass (draw 0 of the run's seed) over batches of
    // the training batch size, on the CPU the demo was trained on: `--samples 1`, `--seed`, the
    // default batch size (config.json's), `--device cpu`.
    let out = run_in(
        &repository(),
        &[
            "eval",
            "--model",
            "weights/demo",
            "--data",
            s(dataset()),
            "--split",
            "Val",
            "--samples",
            "1",
            "--seed",
            &seed,
            "--device",
            "cpu",
            "--out",
            s(&out_dir),
            "--json",
            s(&json),
        ],
    );
    assert!(out.ok, "eval failed: {}", out.stderr);
    let summary = std::fs::read_to_string(&json).unwrap();
    assert_eq!(json_number(&summary, "images") as usize, r.val, "{summary}");
    let evaluated = json_number(&summary, "dice");
    // Tolerance 1e-5: training stores the mean of 200 per-image f32 Dice summed in f32, eval the
    // f64 mean of the same exact ratios. Each of the 199 f32 additions rounds by at most half an
    // ulp of a partial sum below 256 (2^-17 = 7.6e-6), so the f32 mean is within
    // 199 * 7.6e-6 / 200 < 7.6e-6 of the exact one (plus 6e-8 for the ratios and the stored f32):
    // under 1e-5 whatever the values. Typical differences are about 1e-7.
    assert!(
        (evaluated - r.best_val_dice).abs() < 1e-5,
        "weights/demo recorded validation Dice {}, eval gives {evaluated}",
        r.best_val_dice
    );
    // Sharper: replaying training's own reduction (f32 ratio per image, f32 running sum in
    // validation order) on eval's per-image counts gives the recorded f32 exactly, so not one
    // pixel of the 200 masks differs. The intersection is recovered from the 6-decimal Dice and
    // the two pixel counts (its error, below 5e-7 * 9216, is far under a half).
    let csv = std::fs::read_to_string(out_dir.join("Val.csv")).unwrap();
    let mut sum = 0f32;
    let mut rows = 0;
    for line in csv.lines().skip(1) {
        let cells: Vec<&str> = line.split(',').collect();
        let (dice, truth, predicted): (f64, usize, usize) =
            (cells[3].parse().unwrap(), cells[8].parse().unwrap(), cells[9].parse().unwrap());
        let total = truth + predicted;
        let both = (dice * total as f64 / 2.0).round() as usize;
        sum += if total == 0 { 1.0 } else { 2.0 * both as f32 / total as f32 };
        rows += 1;
    }
    assert_eq!(rows, r.val);
    let replayed = sum / rows as f32;
    assert_eq!(replayed, r.best_val_dice as f32, "training's reduction replayed on eval's masks");
}

/// Dice of two 0/255 (or 0/1) masks of the same size.
fn dice(a: &[u8], b: &[u8]) -> f64 {
    let (mut both, mut total) = (0usize, 0usize);
    for (&x, &y) in a.iter().zip(b) {
        both += (x > 0 && y > 0) as usize;
        total += (x > 0) as usize + (y > 0) as usize;
    }
    2.0 * both as f64 / total.max(1) as f64
}

#[test]
fn predict_with_the_default_model_finds_the_lesion_the_prompt_names() {
    let r = record();
    let elsewhere = scratch("elsewhere");
    // The first two test images (the built-in picture and the README's), as `synth` wrote them,
    // with the prompts the generator gives them; each holds two lesions, so the prompt chooses.
    let first = r.train + r.val;
    for id in [first, first + 1] {
        let sample = synthetic::sample(r.seed, id, r.size);
        let image = dataset().join("Test_Folder/img").join(&sample.name);
        let label = image::open(dataset().join("Test_Folder/label").join(&sample.name)).unwrap().to_luma8();
        let truth: Vec<u8> = sample.mask.data.clone();
        assert_eq!(dice(label.as_raw(), &truth), 1.0, "synth's label is not the generator's mask");
        assert!(sample.lesions.len() > 1, "{}: pick an image with several lesions", sample.name);
        // Run from a folder outside the clone: no --model finds weights/demo all the same.
        let maps = elsewhere.join(&sample.name);
        let out = run_in(
            &elsewhere,
            &["predict", "--image", s(&image), "--prompt", &sample.prompt, "--samples", "8", "--out", s(&maps)],
        );
        assert!(out.ok, "predict failed: {}", out.stderr);
        assert!(out.stderr.contains("weights/demo") && !out.stderr.contains("random weights"), "{}", out.stderr);
        assert!(out.stdout.contains("8 samples on "), "{}", out.stdout);
        let mask = image::open(maps.join("mask.png")).unwrap().to_luma8();
        assert!(mask.pixels().any(|p| p[0] == 255), "{}: the mask is empty", sample.name);
        let found = dice(mask.as_raw(), &truth);
        assert!(found > 0.5, "{}: Dice {found:.3} against the lesion \"{}\"", sample.name, sample.prompt);
    }

    // Without --image: the built-in picture is the first test image with its own prompt.
    let sample = synthetic::sample(r.seed, first, r.size);
    let builtin = elsewhere.join("builtin");
    let out = run_in(&elsewhere, &["predict", "--samples", "8", "--out", s(&builtin)]);
    assert!(out.ok, "predict failed: {}", out.stderr);
    assert!(out.stderr.contains(&sample.name) && out.stderr.contains(&sample.prompt), "{}", out.stderr);
    assert_eq!(
        std::fs::read(builtin.join("mask.png")).unwrap(),
        std::fs::read(elsewhere.join(&sample.name).join("mask.png")).unwrap()
    );
}

#[test]
fn eval_without_model_uses_the_demo_checkpoint() {
    let out_dir = scratch("eval-default");
    let out = run_in(
        &scratch("eval-default-cwd"),
        &["eval", "--data", s(dataset()), "--split", "Test", "--samples", "2", "--out", s(&out_dir)],
    );
    assert!(out.ok, "eval failed: {}", out.stderr);
    assert!(out.stderr.contains("weights/demo"), "{}", out.stderr);
    let summary = std::fs::read_to_string(out_dir.join("summary.json")).unwrap();
    assert_eq!(json_number(&summary, "images"), 4.0);
    assert!(json_number(&summary, "dice") > 0.5, "{summary}");
}
