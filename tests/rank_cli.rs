//! `mcs-engine rank` end to end: the ranking CSV of a dataset split and of a plain folder, the
//! order by each score, the scores against a direct computation from the model's per-draw logits,
//! the errors of bad input, and `rank --simulate` on a tiny generated dataset (docs/rank.md).

#[path = "common/cli.rs"]
mod cli;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use cli::{run, s};
use mcs_engine::data::{normalise_bgr, resize_linear};
use mcs_engine::model::folder::load_model_folder;
use mcs_engine::segment::rank::RankScores;
use mcs_engine::segment::{binary_entropy, read_image, Options, Segmenter};
use mcs_engine::{Device, Tensor};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mcs-rank-{}", std::process::id())).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

struct Fixture {
    data: PathBuf,
    model: PathBuf,
}

/// Synthetic data (96 px: 6 train, 2 val, 1 test) and one epoch of `tiny` at a learning rate so
/// low that the weights stay at their random start: such a model marks a good share of every
/// image and its draws disagree, so every score varies between images (a briefly trained model
/// marks nothing, and every score would be 0).
fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let root = scratch("fixture");
        let (data, run_dir) = (root.join("data"), root.join("run"));
        let synth = run(&["synth", "--out", s(&data), "--train", "6", "--val", "2", "--test", "1"]);
        assert_eq!(synth.code, Some(0), "synth failed: {}", synth.stderr);
        let train = run(&[
            "train",
            "--data",
            s(&data),
            "--config",
            "tiny",
            "--epochs",
            "1",
            "--batch-size",
            "2",
            "--lr",
            "1e-9",
            "--out",
            s(&run_dir),
        ]);
        assert_eq!(train.code, Some(0), "train failed: {}", train.stderr);
        Fixture { data, model: run_dir.join("latest") }
    })
}

/// One CSV row.
#[derive(Debug)]
struct Row {
    rank: usize,
    image: String,
    scores: [f64; 3],
    prompt: String,
}

fn read_ranking(path: &Path) -> Vec<Row> {
    let mut reader = csv::Reader::from_path(path).unwrap();
    let header: Vec<String> = reader.headers().unwrap().iter().map(str::to_string).collect();
    assert_eq!(
        header,
        ["rank", "image", "mean_entropy", "expected_dice_loss", "foreground_uncertainty", "prompt"],
        "{}",
        path.display()
    );
    reader
        .records()
        .map(|record| {
            let record = record.unwrap();
            let number = |i: usize| record[i].parse::<f64>().unwrap();
            Row {
                rank: record[0].parse().unwrap(),
                image: record[1].to_string(),
                scores: [number(2), number(3), number(4)],
                prompt: record[5].to_string(),
            }
        })
        .collect()
}

const BY: [(&str, usize); 3] = [("mean-entropy", 0), ("expected-dice-loss", 1), ("foreground-uncertainty", 2)];

fn rank_split(out: &Path, extra: &[&str]) -> cli::Outcome {
    let f = fixture();
    let mut args = vec![
        "rank",
        "--data",
        s(&f.data),
        "--model",
        s(&f.model),
        "--samples",
        "6",
        "--out",
        s(out),
        "--device",
        "cpu",
    ];
    args.extend(extra);
    run(&args)
}

/// Rows ranked 1..n, each train image once, every score finite and in its range, sorted by the
/// column `by` (descending).
fn check_ranking(rows: &[Row], by: usize) {
    let names: HashSet<&str> = rows.iter().map(|r| r.image.as_str()).collect();
    let want: HashSet<String> = (0..6).map(|id| format!("synthetic_{id:06}.png")).collect();
    assert_eq!(names, want.iter().map(String::as_str).collect(), "every train image once");
    assert_eq!(rows.len(), 6);
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row.rank, i + 1);
        let [entropy, loss, foreground] = row.scores;
        // The CSV rounds to 6 decimals, so ln 2 may read as 0.693147 (below ln 2) but never above
        // it by more than half a unit of the last place.
        assert!((0.0..=std::f64::consts::LN_2 + 5e-7).contains(&entropy), "{row:?}");
        assert!((0.0..=1.0).contains(&loss), "{row:?}");
        assert!((0.0..=entropy + 1e-6).contains(&foreground), "foreground part above the whole: {row:?}");
        assert!(row.prompt.starts_with("one "), "{row:?}");
    }
    for pair in rows.windows(2) {
        assert!(pair[0].scores[by] >= pair[1].scores[by], "not descending by column {by}: {pair:?}");
    }
}

#[test]
fn rank_writes_every_image_once_sorted_by_the_default_score() {
    let dir = scratch("default");
    let out = rank_split(&dir.join("rank.csv"), &[]);
    assert_eq!(out.code, Some(0), "rank failed: {}", out.stderr);
    assert!(out.stdout.contains("6 images ranked by mean-entropy (6 samples each"), "{}", out.stdout);
    let rows = read_ranking(&dir.join("rank.csv"));
    check_ranking(&rows, 0);
    // The untrained model is unsure and its draws disagree: scores of 0 everywhere would test
    // nothing.
    assert!(rows.iter().all(|r| r.scores[0] > 0.0) && rows.iter().any(|r| r.scores[1] > 0.0), "{rows:?}");
}

#[test]
fn by_changes_the_order_to_the_chosen_column() {
    let dir = scratch("by");
    let mut orders = Vec::new();
    for (by, column) in BY {
        let path = dir.join(format!("{by}.csv"));
        let out = rank_split(&path, &["--by", by]);
        assert_eq!(out.code, Some(0), "rank --by {by} failed: {}", out.stderr);
        let rows = read_ranking(&path);
        check_ranking(&rows, column);
        orders.push(rows.iter().map(|r| r.image.clone()).collect::<Vec<_>>());
    }
    // The fixture and the noise are deterministic; on it the three scores do not all agree, so
    // at least one --by must reorder the images.
    assert!(orders[0] != orders[1] || orders[1] != orders[2], "every --by gave the same order: {orders:?}");
    let bad = rank_split(&dir.join("x.csv"), &["--by", "entropy"]);
    assert_ne!(bad.code, Some(0));
    assert!(bad.stderr.contains("entropy"), "{}", bad.stderr);
}

/// A plain folder of the fixture's train images with a CSV prompt file listing `listed` of them.
fn plain_folder(dir: &Path, listed: usize) -> (PathBuf, PathBuf) {
    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    let source = fixture().data.join("Train_Folder/img");
    let mut prompts = String::from("Image,Description\n");
    for id in 0..3 {
        let name = format!("synthetic_{id:06}.png");
        std::fs::copy(source.join(&name), images.join(&name)).unwrap();
        if id < listed {
            prompts.push_str(&format!("{name},\"one small round-shaped lesion, at the center of the image\"\n"));
        }
    }
    let prompt_file = dir.join("prompts.csv");
    std::fs::write(&prompt_file, prompts).unwrap();
    (images, prompt_file)
}

#[test]
fn a_plain_folder_with_a_prompt_file_is_ranked() {
    let dir = scratch("folder");
    let (images, prompts) = plain_folder(&dir, 3);
    let out_csv = dir.join("rank.csv");
    let f = fixture();
    let out = run(&[
        "rank",
        "--images",
        s(&images),
        "--prompts",
        s(&prompts),
        "--model",
        s(&f.model),
        "--samples",
        "3",
        "--batch-size",
        "2",
        "--out",
        s(&out_csv),
    ]);
    assert_eq!(out.code, Some(0), "rank failed: {}", out.stderr);
    let rows = read_ranking(&out_csv);
    assert_eq!(rows.len(), 3);
    // The prompt's comma survives the CSV quoting.
    assert!(rows.iter().all(|r| r.prompt == "one small round-shaped lesion, at the center of the image"), "{rows:?}");
}

#[test]
fn bad_input_is_refused_naming_the_file() {
    let dir = scratch("bad");
    let f = fixture();
    let rank = |images: &Path, prompts: &Path| {
        run(&[
            "rank",
            "--images",
            s(images),
            "--prompts",
            s(prompts),
            "--model",
            s(&f.model),
            "--out",
            s(&dir.join("r.csv")),
        ])
    };
    // An image the prompt file does not list.
    let (images, prompts) = plain_folder(&dir.join("unlisted"), 2);
    let out = rank(&images, &prompts);
    assert_ne!(out.code, Some(0));
    let missing = images.join("synthetic_000002.png");
    assert!(out.stderr.contains(&format!("{}: no prompt for this image", missing.display())), "{}", out.stderr);
    // An empty folder.
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let out = rank(&empty, &prompts);
    assert_ne!(out.code, Some(0));
    assert!(out.stderr.contains(&format!("{}: holds no images", empty.display())), "{}", out.stderr);
    // A prompt row naming no file of the folder.
    let (images, _) = plain_folder(&dir.join("ghost"), 3);
    let ghost = dir.join("ghost.csv");
    std::fs::write(&ghost, "Image,Description\nnot_there.png,one lesion\n").unwrap();
    let out = rank(&images, &ghost);
    assert_ne!(out.code, Some(0));
    assert!(
        out.stderr.contains("not_there.png") && out.stderr.contains(&ghost.display().to_string()),
        "{}",
        out.stderr
    );
    // Nothing to rank, and --images without --prompts.
    let out = run(&["rank", "--model", s(&f.model)]);
    assert_ne!(out.code, Some(0));
    assert!(out.stderr.contains("--images DIR --prompts FILE"), "{}", out.stderr);
    let out = run(&["rank", "--images", s(&images)]);
    assert_ne!(out.code, Some(0));
    assert!(out.stderr.contains("--prompts"), "{}", out.stderr);
    // No earlier ranking was written over by a failed run.
    assert!(!dir.join("r.csv").exists());
}

/// Scores computed here from the model's per-draw logits, independently of the library's code:
/// f64 sigmoids, the mean, the masks, Dice per draw.
fn direct_scores(logits: &[f32], samples: usize, threshold: f64) -> RankScores {
    let pixels = logits.len() / samples;
    let probability = |x: f32| 1.0 / (1.0 + (-f64::from(x)).exp());
    let mean: Vec<f64> = (0..pixels)
        .map(|i| (0..samples).map(|d| probability(logits[d * pixels + i])).sum::<f64>() / samples as f64)
        .collect();
    let mean_mask: Vec<bool> = mean.iter().map(|&p| p > threshold).collect();
    let entropy: Vec<f64> = mean.iter().map(|&p| f64::from(binary_entropy(p as f32))).collect();
    let mut dice_sum = 0.0;
    for d in 0..samples {
        let mask = (0..pixels).map(|i| probability(logits[d * pixels + i]) > threshold);
        let (mut both, mut total) = (0.0, 0.0);
        for (m, &t) in mask.zip(&mean_mask) {
            both += f64::from(u8::from(m && t));
            total += f64::from(u8::from(m)) + f64::from(u8::from(t));
        }
        dice_sum += if total == 0.0 { 1.0 } else { 2.0 * both / total };
    }
    RankScores {
        mean_entropy: entropy.iter().sum::<f64>() / pixels as f64,
        expected_dice_loss: 1.0 - dice_sum / samples as f64,
        foreground_uncertainty: entropy.iter().zip(&mean_mask).filter(|(_, &m)| m).map(|(e, _)| e).sum::<f64>()
            / pixels as f64,
    }
}

#[test]
fn library_scores_match_a_direct_computation_from_the_draws() {
    let f = fixture();
    let folder = load_model_folder(&f.model, &Device::Cpu).unwrap();
    let segmenter = Segmenter::load_on(&f.model, &Device::Cpu).unwrap();
    let size = folder.model.config().image_size;
    let (seed, samples) = (7, 5);
    let options = Options { samples, seed, ..Options::default() };
    for id in 0..3 {
        let path = f.data.join(format!("Train_Folder/img/synthetic_{id:06}.png"));
        let prompt = "one medium oval-shaped lesion at the top left of the image";
        let image = read_image(&path).unwrap();
        let got = segmenter.rank_scores_batch(&[(&image, prompt)], &options).unwrap()[0];
        // The same draws, straight from the model: its input is the training pre-processing.
        let pixels = normalise_bgr(&resize_linear(&image, size, size).unwrap()).unwrap();
        let pixels = Tensor::from_slice(&pixels, &[1, 3, size, size], &Device::Cpu).unwrap();
        let ids = folder.tokenizer.encode(prompt).unwrap();
        let logits = folder.model.predict(&pixels, &ids, seed, samples).unwrap().logits.to_vec().unwrap();
        let want = direct_scores(&logits, samples, 0.5);
        // The engine's maps are f32 (sigmoid, mean, log): 1e-5 nats is ~100 f32 roundings of
        // ln 2. The Dice loss counts pixels; f32 against f64 could move a pixel's mask only at
        // p within 1e-7 of the threshold, which no pixel of these images is near (checked by
        // the exact match below).
        assert!((got.mean_entropy - want.mean_entropy).abs() < 1e-5, "image {id}: {got:?} vs {want:?}");
        assert!(
            (got.foreground_uncertainty - want.foreground_uncertainty).abs() < 1e-5,
            "image {id}: {got:?} vs {want:?}"
        );
        assert!((got.expected_dice_loss - want.expected_dice_loss).abs() < 1e-12, "image {id}: {got:?} vs {want:?}");
        assert!(got.expected_dice_loss > 0.0, "image {id}: the draws should disagree on an untrained model");
        // One draw is its own mean: nothing to disagree about.
        let one = segmenter.rank_scores_batch(&[(&image, prompt)], &Options { samples: 1, ..options.clone() }).unwrap();
        assert_eq!(one[0].expected_dice_loss, 0.0);
    }
}

#[test]
fn simulate_runs_both_arms_end_to_end_on_a_tiny_dataset() {
    let dir = scratch("simulate");
    let out_dir = dir.join("sim");
    let out = run(&[
        "rank",
        "--simulate",
        "--config",
        "tiny",
        "--seeds",
        "1",
        "--epochs",
        "1",
        "--finetune-epochs",
        "1",
        "--synthetic-train",
        "20",
        "--synthetic-val",
        "3",
        "--samples",
        "2",
        "--device",
        "cpu",
        "--out",
        s(&out_dir),
    ]);
    assert_eq!(out.code, Some(0), "rank --simulate failed: {}", out.stderr);
    let table = std::fs::read_to_string(out_dir.join("simulation.csv")).unwrap();
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines[0], "seed,initial_dice,ranked_dice,random_dice,difference,shared_picks");
    assert!(lines[1].starts_with("666,"), "{table}");
    assert!(lines[2].starts_with("mean,") && lines[3].starts_with("std,"), "{table}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("simulation.json")).unwrap()).unwrap();
    let seed = &json["seeds"][0];
    let (ranked, random) = (seed["ranked_dice"].as_f64().unwrap(), seed["random_dice"].as_f64().unwrap());
    assert!((0.0..=1.0).contains(&ranked) && (0.0..=1.0).contains(&random), "{json}");
    assert!((seed["difference"].as_f64().unwrap() - (ranked - random)).abs() < 1e-12, "{json}");
    // 10 % and 15 % of 20 images.
    assert_eq!((json["initial_images"].as_u64(), json["added_images"].as_u64()), (Some(2), Some(3)), "{json}");
    // Both arms trained from the first model, and the pool's ranking (18 images) was written.
    for run_dir in ["initial", "ranked", "random"] {
        assert!(out_dir.join("seed_666").join(run_dir).join("latest/model.safetensors").is_file(), "{run_dir}");
    }
    assert_eq!(read_ranking_len(&out_dir.join("seed_666/ranking.csv")), 18);
    assert!(out.stdout.contains("ranked") && out.stdout.contains("random"), "{}", out.stdout);
    // Flags of the ranking alone are refused with --simulate rather than ignored.
    let mixed = run(&["rank", "--simulate", "--model", s(&fixture().model), "--out", s(&dir.join("other"))]);
    assert_ne!(mixed.code, Some(0));
    assert!(mixed.stderr.contains("--model"), "{}", mixed.stderr);
    // A second run into the same folder would lose the first one's results: refused.
    let again = run(&["rank", "--simulate", "--config", "tiny", "--out", s(&out_dir)]);
    assert_ne!(again.code, Some(0));
    assert!(again.stderr.contains("already holds files"), "{}", again.stderr);
}

fn read_ranking_len(path: &Path) -> usize {
    csv::Reader::from_path(path).unwrap().records().count()
}
