//! `mcs-engine saliency` and `mcs-engine eval --zero-shot` end to end on images `synth` wrote,
//! with the demo checkpoint (nothing is trained), and their refusals.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::read_npy;

fn binary() -> PathBuf {
    std::env::var_os("MCS_ENGINE_BIN").map_or_else(|| env!("CARGO_BIN_EXE_mcs-engine").into(), Into::into)
}

struct Outcome {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn run(args: &[&str]) -> Outcome {
    // From the repository root, so that the default model is the demo checkpoint there.
    let out = Command::new(binary()).args(args).current_dir(common::repo_root()).output().unwrap();
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
    let dir = std::env::temp_dir().join(format!("mcs-saliency-cli-{}", std::process::id())).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A synthetic dataset of 96 px images (1 train, 1 val, 3 test), written once per test binary.
fn data() -> &'static PathBuf {
    static DATA: OnceLock<PathBuf> = OnceLock::new();
    DATA.get_or_init(|| {
        let data = scratch("fixture").join("data");
        let synth = run(&["synth", "--out", s(&data), "--train", "1", "--val", "1", "--test", "3"]);
        assert!(synth.ok, "synth failed: {}", synth.stderr);
        data
    })
}

fn test_images() -> Vec<PathBuf> {
    let mut images: Vec<PathBuf> =
        std::fs::read_dir(data().join("Test_Folder/img")).unwrap().map(|entry| entry.unwrap().path()).collect();
    images.sort();
    images
}

/// Checks the four files of one image of `width` x `height`; returns the prompts.json value.
fn check_outputs(dir: &Path, width: u32, height: u32) -> serde_json::Value {
    for png in ["saliency.png", "coarse_mask.png"] {
        let picture = image::open(dir.join(png)).unwrap_or_else(|e| panic!("{}/{png}: {e}", dir.display()));
        assert_eq!((picture.width(), picture.height()), (width, height), "{png}");
    }
    let ((rows, cols), map) = read_npy(&dir.join("saliency.npy"));
    assert_eq!((rows, cols), (height as usize, width as usize));
    assert!(map.iter().all(|v| (0.0..=1.0).contains(v)), "the saliency is normalised");
    let grey = image::open(dir.join("saliency.png")).unwrap().to_luma8();
    for (g, v) in grey.pixels().zip(&map) {
        assert_eq!(g[0], (v * 255.0).round() as u8, "saliency.png is the .npy in 8 bits");
    }
    let mask = image::open(dir.join("coarse_mask.png")).unwrap().to_luma8();
    assert!(mask.pixels().all(|p| p[0] == 0 || p[0] == 255));
    let text = std::fs::read_to_string(dir.join("prompts.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["image_size"], serde_json::json!([width, height]));
    let boxes = json["boxes"].as_array().unwrap();
    let points = json["points"].as_array().unwrap();
    let labels = json["labels"].as_array().unwrap();
    assert_eq!(boxes.len(), 1, "one component by default");
    assert_eq!((points.len(), labels.len()), (1, 1));
    let b: Vec<u64> = boxes[0].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
    assert!(b[0] <= b[2] && b[1] <= b[3] && b[2] < u64::from(width) && b[3] < u64::from(height), "{b:?}");
    let pts = points[0].as_array().unwrap();
    assert!(!pts.is_empty() && pts.len() <= 10);
    assert_eq!(labels[0].as_array().unwrap().len(), pts.len());
    assert!(labels[0].as_array().unwrap().iter().all(|l| l.as_u64() == Some(1)));
    for p in pts {
        let (x, y) = (p[0].as_u64().unwrap(), p[1].as_u64().unwrap());
        assert!((b[0]..=b[2]).contains(&x) && (b[1]..=b[3]).contains(&y), "point {p} outside box {b:?}");
        assert_eq!(mask.get_pixel(x as u32, y as u32)[0], 255, "point {p} is in the coarse mask");
    }
    json
}

#[test]
fn saliency_of_one_image_writes_every_file() {
    let out = scratch("one");
    let image = &test_images()[0];
    // Defaults throughout (the demo checkpoint, 10 steps of 10 copies); only the CPU is asked for
    // so the test means the same with or without a GPU.
    let result = run(&[
        "saliency",
        "--image",
        s(image),
        "--prompt",
        "a small round lesion",
        "--out",
        s(&out),
        "--device",
        "cpu",
    ]);
    assert!(result.ok, "saliency failed: {}", result.stderr);
    assert!(result.stderr.contains("demo checkpoint"), "{}", result.stderr);
    assert!(result.stdout.contains("10 steps x 10 copies"), "{}", result.stdout);
    check_outputs(&out, 96, 96);
    // Reproducible: the same run writes the same files.
    let again = scratch("again");
    let result = run(&[
        "saliency",
        "--image",
        s(image),
        "--prompt",
        "a small round lesion",
        "--out",
        s(&again),
        "--device",
        "cpu",
    ]);
    assert!(result.ok, "{}", result.stderr);
    for file in ["saliency.npy", "prompts.json", "coarse_mask.png"] {
        assert_eq!(std::fs::read(out.join(file)).unwrap(), std::fs::read(again.join(file)).unwrap(), "{file}");
    }
}

#[test]
fn saliency_of_a_split_and_zero_shot_eval() {
    let out = scratch("split");
    let common_flags = ["--steps", "3", "--copies", "4", "--device", "cpu"];
    let mut args = vec!["saliency", "--data", s(data()), "--split", "Test", "--out", s(&out)];
    args.extend(common_flags);
    let result = run(&args);
    assert!(result.ok, "saliency --data failed: {}", result.stderr);
    assert!(result.stdout.contains("3 images of Test_Folder"), "{}", result.stdout);
    for image in test_images() {
        let stem = image.file_stem().unwrap().to_str().unwrap();
        check_outputs(&out.join(stem), 96, 96);
    }

    let eval_out = scratch("eval");
    let json = eval_out.join("summary-copy.json");
    let mut args = vec!["eval", "--zero-shot", "--data", s(data()), "--out", s(&eval_out), "--json", s(&json)];
    args.extend(common_flags);
    let result = run(&args);
    assert!(result.ok, "eval --zero-shot failed: {}", result.stderr);
    assert!(result.stdout.contains("zero-shot M2IB saliency (3 steps x 4 copies"), "{}", result.stdout);
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let summary = &summary[0];
    assert_eq!(summary["images"], 3);
    assert_eq!(summary["noise"], "m2ib");
    assert!(summary["auroc"].is_null(), "no uncertainty map, no AUROC");
    for metric in ["dice", "nsd", "ece", "brier"] {
        let value = summary[metric].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&value), "{metric} = {value}");
    }
    let csv = std::fs::read_to_string(eval_out.join("Test.csv")).unwrap();
    assert_eq!(csv.lines().count(), 4, "a header and three images: {csv}");

    // The eval's coarse masks are those `saliency` wrote: its Dice is the Dice of those files.
    let mut dice = 0.0;
    for image in test_images() {
        let stem = image.file_stem().unwrap().to_str().unwrap();
        let mask = image::open(out.join(stem).join("coarse_mask.png")).unwrap().to_luma8();
        let truth = image::open(data().join("Test_Folder/label").join(image.file_name().unwrap())).unwrap().to_luma8();
        let (mut both, mut total) = (0usize, 0usize);
        for (m, t) in mask.pixels().zip(truth.pixels()) {
            let (m, t) = (m[0] > 0, t[0] > 0);
            both += usize::from(m && t);
            total += usize::from(m) + usize::from(t);
        }
        dice += if total == 0 { 1.0 } else { 2.0 * both as f64 / total as f64 };
    }
    // Both are means of three per-image ratios computed in f64 from the same masks.
    assert!((summary["dice"].as_f64().unwrap() - dice / 3.0).abs() < 1e-9, "{summary} vs {}", dice / 3.0);
}

#[test]
fn bad_input_is_refused_with_a_clear_error() {
    let out = scratch("refusals");
    let image = &test_images()[0];
    let missing = out.join("nowhere.png");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["saliency", "--image", s(image), "--out", s(&out)], "--prompt"),
        (vec!["saliency", "--image", s(&missing), "--prompt", "a lesion", "--out", s(&out)], "nowhere.png"),
        (vec!["saliency", "--image", s(image), "--prompt", "  ", "--out", s(&out)], "--prompt is empty"),
        (vec!["saliency", "--image", s(image), "--prompt", "a lesion", "--copies", "0"], "--copies"),
        (vec!["saliency", "--image", s(image), "--prompt", "a lesion", "--beta", "-1"], "--beta"),
        (vec!["saliency", "--image", s(image), "--prompt", "a lesion", "--lr", "nan"], "--lr"),
        (vec!["saliency", "--image", s(image), "--prompt", "a lesion", "--layer", "4", "--device", "cpu"], "--layer"),
        (vec!["saliency", "--out", s(&out)], "--image"),
    ];
    for (args, needle) in cases {
        let result = run(&args);
        assert!(!result.ok, "{args:?} succeeded");
        assert!(!result.stderr.contains("panicked"), "{args:?} panicked: {}", result.stderr);
        assert!(result.stderr.contains(needle), "{args:?}: expected `{needle}` in: {}", result.stderr);
    }
    assert!(!out.join("saliency.png").exists(), "nothing is written on a refusal");
}
