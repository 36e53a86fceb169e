//! `mcs-engine finetune-clip` as a new user runs it: on the synthetic task's official layout and on
//! a CSV of image-caption pairs, from the demo checkpoint; what it writes (model folders that
//! `predict` reads, metrics with the recall before and after, curves); `--layers N` training only
//! the last blocks; and the refusals of bad caption files, each naming the file and the row.

#[path = "common/cli.rs"]
mod cli;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use cli::{run, s};
use mcs_engine::data::captions::read_caption_csv;
use mcs_engine::model::weights::WeightStore;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mcs-finetune-clip-{}", std::process::id())).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The synthetic task in the official layout: 8 training and 4 validation pairs.
fn data() -> &'static Path {
    static DATA: OnceLock<PathBuf> = OnceLock::new();
    DATA.get_or_init(|| {
        let data = scratch("data");
        let out = run(&["synth", "--out", s(&data), "--train", "8", "--val", "4", "--test", "2"]);
        assert_eq!(out.code, Some(0), "synth: {}", out.stderr);
        data
    })
}

fn finetune(out: &Path, extra: &[&str]) -> cli::Outcome {
    let mut args = vec!["finetune-clip", "--epochs", "2", "--batch-size", "4", "--warmup-steps", "1", "--lr", "1e-4"];
    args.extend(["--out", s(out)]);
    args.extend(extra);
    run(&args)
}

#[test]
fn on_the_official_layout_it_writes_model_folders_metrics_and_curves() {
    let out = scratch("layout");
    let outcome = finetune(&out, &["--data", s(data())]);
    assert_eq!(outcome.code, Some(0), "finetune-clip: {}", outcome.stderr);
    assert!(
        outcome.stdout.contains("image->text R@1") && outcome.stdout.contains("text->image R@1"),
        "{}",
        outcome.stdout
    );
    for file in ["best/model.safetensors", "best/config.json", "latest/tokenizer.json", "metrics.csv", "curves.png"] {
        assert!(out.join(file).is_file(), "missing {file}");
    }
    let metrics = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    let rows: Vec<&str> = metrics.lines().collect();
    assert_eq!(rows.len(), 4, "header, epoch 0 (before), epochs 1 and 2:\n{metrics}");
    assert!(rows[0].starts_with("epoch,learning_rate,loss,i2t_r1"));
    for row in &rows[1..] {
        let recall: Vec<f64> = row.split(',').skip(3).take(4).map(|v| v.parse().unwrap()).collect();
        assert!(recall.iter().all(|r| (0.0..=1.0).contains(r)), "{row}");
    }
    // Every step moved the towers: the fine-tuned weights differ from the demo checkpoint's.
    let demo = WeightStore::load(&repo("weights/demo/model.safetensors")).unwrap().into_tensors();
    let tuned = WeightStore::load(&out.join("latest/model.safetensors")).unwrap().into_tensors();
    let key = "vision_model.transformer.resblocks.0.attn.in_proj_weight";
    assert_ne!(demo[key].to_vec().unwrap(), tuned[key].to_vec().unwrap(), "{key} did not train");
    let key = "mask_head.0.weight";
    assert_eq!(demo[key].to_vec().unwrap(), tuned[key].to_vec().unwrap(), "the decoder is not part of the towers");
    // The folder is a model folder: predict reads it.
    let image = data().join("Test_Folder/img");
    let image = std::fs::read_dir(&image).unwrap().next().unwrap().unwrap().path();
    let maps = scratch("predict");
    let predict = run(&[
        "predict",
        "--model",
        s(&out.join("best")),
        "--image",
        s(&image),
        "--prompt",
        "a lesion",
        "--samples",
        "2",
        "--out",
        s(&maps),
    ]);
    assert_eq!(predict.code, Some(0), "predict on the fine-tuned folder: {}", predict.stderr);
}

fn repo(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// A CSV of the synthetic training images with their prompts, paths relative to the CSV.
fn caption_csv(dir: &Path, rows: &[(String, String)]) -> PathBuf {
    let path = dir.join("captions.csv");
    let mut text = String::from("id,image,caption\n");
    for (i, (image, caption)) in rows.iter().enumerate() {
        text.push_str(&format!("{i},{image},\"{caption}\"\n"));
    }
    std::fs::write(&path, text).unwrap();
    path
}

fn synthetic_rows(dir: &Path) -> Vec<(String, String)> {
    let images = data().join("Train_Folder/img");
    let mut names: Vec<String> =
        std::fs::read_dir(&images).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    let local = dir.join("img");
    std::fs::create_dir_all(&local).unwrap();
    names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            std::fs::copy(images.join(name), local.join(name)).unwrap();
            (format!("img/{name}"), format!("case {} with a lesion", i % 3))
        })
        .collect()
}

#[test]
fn on_a_csv_with_the_last_block_only() {
    let dir = scratch("csv");
    let csv = caption_csv(&dir, &synthetic_rows(&dir));
    let out = dir.join("run");
    let outcome = finetune(&out, &["--captions", s(&csv), "--val-fraction", "0.25", "--layers", "1"]);
    assert_eq!(outcome.code, Some(0), "finetune-clip: {}", outcome.stderr);
    assert!(outcome.stderr.contains("on 6 pairs") && outcome.stderr.contains("2 held out"), "{}", outcome.stderr);
    let demo = WeightStore::load(&repo("weights/demo/model.safetensors")).unwrap().into_tensors();
    let tuned = WeightStore::load(&out.join("latest/model.safetensors")).unwrap().into_tensors();
    let same = |key: &str| demo[key].to_vec().unwrap() == tuned[key].to_vec().unwrap();
    // The small config has 4 blocks per tower: only block 3 and the projections train.
    assert!(same("vision_model.transformer.resblocks.0.attn.in_proj_weight"));
    assert!(same("text_model.transformer.encoder.layer.2.attention.self.query.weight"));
    assert!(!same("vision_model.transformer.resblocks.3.attn.in_proj_weight"));
    assert!(!same("vision_model.proj"));
}

#[test]
fn bad_caption_files_are_refused_naming_the_file_and_row() {
    let dir = scratch("bad");
    let rows = synthetic_rows(&dir);
    let refused = |text: &str, needles: &[&str]| {
        let path = dir.join("bad.csv");
        std::fs::write(&path, text).unwrap();
        let err = read_caption_csv(&path).unwrap_err().to_string();
        assert!(err.contains("bad.csv"), "{err}");
        for needle in needles {
            assert!(err.contains(needle), "expected `{needle}` in: {err}");
        }
        // The command refuses it too, with exit code 1 and the same message.
        let out = run(&["finetune-clip", "--captions", s(&path), "--out", s(&dir.join("never"))]);
        assert_eq!(out.code, Some(1), "{}", out.stderr);
        assert!(out.stderr.contains("bad.csv"), "{}", out.stderr);
        assert!(!dir.join("never").exists(), "a refused run created its output folder");
    };
    refused("file,text\na.png,x\n", &["needs an `image` and a `caption` column", "\"file\""]);
    refused(&format!("image,caption\n{},\n", rows[0].0), &["row 2", "empty caption"]);
    refused("image,caption\nimg/missing.png,a lesion\n", &["row 2", "missing.png", "does not exist"]);
    refused("image,caption\n../../etc/passwd,a lesion\n", &["row 2", "inside the CSV's folder"]);
    refused("image,caption\n", &["no image-caption pairs"]);
    // Nothing to hold out from: too few pairs.
    let two = caption_csv(&dir, &rows[..2]);
    let out = run(&["finetune-clip", "--captions", s(&two), "--out", s(&dir.join("never"))]);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("2 image-caption pairs"), "{}", out.stderr);
    // A batch of one has no negatives: refused by the parser.
    let out = run(&["finetune-clip", "--captions", s(&two), "--batch-size", "1"]);
    assert_eq!(out.code, Some(2), "{}", out.stderr);
}
