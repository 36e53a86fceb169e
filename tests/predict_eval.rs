//! `mcs-engine predict` and `mcs-engine eval` end to end on a synthetic dataset that `synth`
//! wrote and a `small` model that `train` wrote (once per test binary, about a second).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::read_npy;

/// The binary under test: `MCS_ENGINE_BIN` when set (a packed GPU kit), else cargo's.
fn binary() -> PathBuf {
    std::env::var_os("MCS_ENGINE_BIN").map_or_else(|| env!("CARGO_BIN_EXE_mcs-engine").into(), Into::into)
}

struct Outcome {
    ok: bool,
    stdout: String,
    stderr: String,
}

fn run_with(args: &[&str], env: &[(&str, &str)]) -> Outcome {
    let mut command = Command::new(binary());
    command.args(args);
    for (key, value) in env {
        command.env(key, value);
    }
    let out = command.output().unwrap();
    Outcome {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into(),
        stderr: String::from_utf8_lossy(&out.stderr).into(),
    }
}

fn run(args: &[&str]) -> Outcome {
    run_with(args, &[])
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Temporary folders of this test binary.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mcs-predict-eval-{}", std::process::id())).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

struct Fixture {
    data: PathBuf,
    model: PathBuf,
    run: PathBuf,
}

/// Synthetic data (96 px: 4 train, 3 val, 3 test) and one epoch of `small` on it at a learning
/// rate so low that the weights stay at their random start: such a model marks a good share of
/// every image, so Dice and the maps depend on every noise draw (a trained one-epoch model marks
/// nothing and would make the Dice comparisons trivially 0 = 0). 96 px is also the model's own
/// size, so validation and eval see the same pixels.
fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let root = scratch("fixture");
        let (data, run_dir) = (root.join("data"), root.join("run"));
        let synth = run(&["synth", "--out", s(&data), "--train", "4", "--val", "3", "--test", "3"]);
        assert!(synth.ok, "synth failed: {}", synth.stderr);
        let train = run(&[
            "train",
            "--data",
            s(&data),
            "--config",
            "small",
            "--epochs",
            "1",
            "--batch-size",
            "2",
            "--lr",
            "1e-9",
            "--out",
            s(&run_dir),
        ]);
        assert!(train.ok, "train failed: {}", train.stderr);
        Fixture { data, model: run_dir.join("latest"), run: run_dir }
    })
}

/// A non-square test picture (the first test image resized to 150 x 110), and its prompt.
fn odd_sized_image(dir: &Path) -> (PathBuf, String) {
    let source = fixture().data.join("Test_Folder/img/synthetic_000007.png");
    let picture = image::open(&source).unwrap().resize_exact(150, 110, image::imageops::FilterType::Triangle);
    let path = dir.join("odd.png");
    picture.save(&path).unwrap();
    (path, "one small round-shaped lesion at the center of the image".into())
}

const OUTPUTS: [&str; 6] =
    ["mask.png", "probability.png", "probability.npy", "uncertainty.png", "uncertainty.npy", "overlay.png"];

fn all_output_bytes(dir: &Path) -> Vec<Vec<u8>> {
    OUTPUTS.iter().map(|f| std::fs::read(dir.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"))).collect()
}

#[test]
fn predict_writes_every_map_at_the_input_size() {
    let dir = scratch("one");
    let (image, prompt) = odd_sized_image(&dir);
    let maps = dir.join("maps");
    let out = run(&[
        "predict",
        "--model",
        s(&fixture().model),
        "--image",
        s(&image),
        "--prompt",
        &prompt,
        "--samples",
        "5",
        "--resize",
        "bilinear",
        "--out",
        s(&maps),
    ]);
    assert!(out.ok, "predict failed: {}", out.stderr);
    assert!(out.stdout.contains("5 samples on ") && out.stdout.contains("150x110"), "{}", out.stdout);
    for png in ["mask.png", "probability.png", "uncertainty.png", "overlay.png"] {
        let picture = image::open(maps.join(png)).unwrap_or_else(|e| panic!("{png}: {e}"));
        assert_eq!((picture.width(), picture.height()), (150, 110), "{png}");
    }
    let (shape, probability) = read_npy(&maps.join("probability.npy"));
    assert_eq!(shape, (110, 150));
    let (shape, uncertainty) = read_npy(&maps.join("uncertainty.npy"));
    assert_eq!(shape, (110, 150));
    assert!(probability.iter().all(|p| (0.0..=1.0).contains(p)));
    assert!(uncertainty.iter().all(|u| (0.0..=std::f32::consts::LN_2 + 1e-6).contains(u)));
    // With --resize bilinear the mask is the thresholded full-resolution probability (the default,
    // official, one is checked against eval below); this model marks a real share of the pixels.
    let mask = image::open(maps.join("mask.png")).unwrap().to_luma8();
    let marked = mask.pixels().filter(|p| p[0] == 255).count();
    for (p, m) in probability.iter().zip(mask.pixels()) {
        assert_eq!(m[0] == 255, *p > 0.5);
    }
    assert!(marked > 0 && marked < 150 * 110, "{marked} marked pixels");
}

#[test]
fn predict_is_bit_identical_across_runs_and_thread_counts() {
    let dir = scratch("threads");
    let (image, prompt) = odd_sized_image(&dir);
    let predict = |out: &Path, threads: &str| {
        let result = run_with(
            &[
                "predict",
                "--model",
                s(&fixture().model),
                "--image",
                s(&image),
                "--prompt",
                &prompt,
                "--samples",
                "8",
                "--seed",
                "5",
                "--out",
                s(out),
            ],
            &[("RAYON_NUM_THREADS", threads)],
        );
        assert!(result.ok, "predict with {threads} thread(s) failed: {}", result.stderr);
        all_output_bytes(out)
    };
    let one = predict(&dir.join("one-thread"), "1");
    let two = predict(&dir.join("two-threads"), "2");
    let again = predict(&dir.join("two-threads-again"), "2");
    for (i, name) in OUTPUTS.iter().enumerate() {
        assert!(one[i] == two[i], "{name} differs between 1 and 2 threads");
        assert!(two[i] == again[i], "{name} differs between two runs");
    }
    // Another seed draws other noise (so the equality above is not vacuous).
    let reseeded = run(&[
        "predict",
        "--model",
        s(&fixture().model),
        "--image",
        s(&image),
        "--prompt",
        &prompt,
        "--samples",
        "8",
        "--seed",
        "6",
        "--out",
        s(&dir.join("reseeded")),
    ]);
    assert!(reseeded.ok);
    assert!(std::fs::read(dir.join("reseeded/probability.npy")).unwrap() != one[2]);
}

#[test]
fn predict_on_a_split_writes_one_folder_per_image_like_single_calls() {
    let dir = scratch("split");
    // A CSV prompt file naming two of the three test images with prompts of our own.
    let prompts = dir.join("prompts.csv");
    std::fs::write(
        &prompts,
        "Image,Description\nsynthetic_000008.png,one large lesion at the top of the image\nsynthetic_000009.png,a small lesion\n",
    )
    .unwrap();
    let maps = dir.join("maps");
    let data = &fixture().data;
    let model = &fixture().model;
    let out = run(&[
        "predict",
        "--model",
        s(model),
        "--data",
        s(data),
        "--split",
        "Test",
        "--prompts",
        s(&prompts),
        "--samples",
        "4",
        "--out",
        s(&maps),
    ]);
    assert!(out.ok, "predict on a split failed: {}", out.stderr);
    assert!(out.stdout.contains("2 images of Test_Folder"), "{}", out.stdout);
    assert!(out.stderr.contains("1 image(s)"), "the unlisted image is not reported: {}", out.stderr);
    assert!(!maps.join("synthetic_000007").exists(), "an unlisted image was predicted");
    for name in ["synthetic_000008", "synthetic_000009"] {
        for file in OUTPUTS {
            assert!(maps.join(name).join(file).is_file(), "{name}/{file} missing");
        }
    }
    // Each image of a split is predicted as the single-image command predicts it.
    let single = dir.join("single");
    let image = data.join("Test_Folder/img/synthetic_000008.png");
    let alone = run(&[
        "predict",
        "--model",
        s(model),
        "--image",
        s(&image),
        "--prompt",
        "one large lesion at the top of the image",
        "--samples",
        "4",
        "--out",
        s(&single),
    ]);
    assert!(alone.ok, "{}", alone.stderr);
    assert!(all_output_bytes(&single) == all_output_bytes(&maps.join("synthetic_000008")));
}

/// A JSON number field of the first object in `text` (serde_json is a dependency of the crate,
/// not of the tests: a plain search keeps the test free of it).
fn json_number(text: &str, key: &str) -> f64 {
    let after = text.split(&format!("\"{key}\":")).nth(1).unwrap_or_else(|| panic!("no {key} in {text}"));
    after.trim_start().split([',', '\n', '}']).next().unwrap().trim().parse().unwrap()
}

#[test]
fn eval_with_one_sample_reproduces_the_validation_dice_of_training() {
    let dir = scratch("eval-val");
    let json = dir.join("summary.json");
    let out = run(&[
        "eval",
        "--model",
        s(&fixture().model),
        "--data",
        s(&fixture().data),
        "--split",
        "Val",
        "--samples",
        "1",
        "--out",
        s(&dir),
        "--json",
        s(&json),
    ]);
    assert!(out.ok, "eval failed: {}", out.stderr);
    let state = std::fs::read_to_string(fixture().run.join("latest/training_state.json")).unwrap();
    let trained = json_number(&state, "val_dice");
    let summary = std::fs::read_to_string(&json).unwrap();
    let evaluated = json_number(&summary, "dice");
    assert!(trained > 0.01, "validation Dice {trained} is too small to tell draws apart");
    // Training averages per-image f32 Dice in f32 and stores f32; eval uses f64: both round the
    // same exact ratios, so they agree to f32 precision.
    assert!((trained - evaluated).abs() < 1e-6, "train reported {trained}, eval {evaluated}");
    // An image's maps do not depend on its batch: batches of one give the same per-image scores,
    // bit for bit (the noise is keyed by the draw, not the batch row; docs/model.md §5).
    let other = run(&[
        "eval",
        "--model",
        s(&fixture().model),
        "--data",
        s(&fixture().data),
        "--split",
        "Val",
        "--samples",
        "1",
        "--batch-size",
        "1",
        "--out",
        s(&dir.join("batch1")),
    ]);
    assert!(other.ok, "{}", other.stderr);
    let other_csv = std::fs::read_to_string(dir.join("batch1/Val.csv")).unwrap();
    assert_eq!(other_csv, std::fs::read_to_string(dir.join("Val.csv")).unwrap(), "the batch size changed the scores");

    // The table, and the per-image CSV with one row per image.
    assert!(out.stdout.contains("DSC %") && out.stdout.contains("Val"), "{}", out.stdout);
    let csv = std::fs::read_to_string(dir.join("Val.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert!(lines[0].starts_with("image,width,height,dice,nsd,ece,brier,auroc"), "{}", lines[0]);
    assert_eq!(lines.len(), 4, "{csv}");
    for key in ["nsd", "ece", "brier", "auroc"] {
        let value = json_number(&summary, key);
        assert!((0.0..=1.0).contains(&value), "{key} = {value}");
    }
}

/// Column `key` of every row of an eval CSV, by image name.
fn csv_column(csv: &str, key: &str) -> std::collections::BTreeMap<String, String> {
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let at = header.iter().position(|h| *h == key).unwrap_or_else(|| panic!("no column {key}"));
    lines.map(|line| line.split(',').collect::<Vec<_>>()).map(|row| (row[0].to_string(), row[at].to_string())).collect()
}

/// `eval` scores exactly the masks `predict` writes with the same flags, under both mask resizes,
/// on images larger than the model (120 px against 96) so that the two resizes differ.
#[test]
fn eval_scores_the_masks_predict_writes_with_the_same_flags() {
    let dir = scratch("same-masks");
    let data = dir.join("data");
    let synth = run(&["synth", "--out", s(&data), "--size", "120", "--train", "1", "--val", "1", "--test", "4"]);
    assert!(synth.ok, "synth failed: {}", synth.stderr);
    let mut pixels_by_resize = Vec::new();
    for resize in ["official", "bilinear"] {
        let flags = ["--model", s(&fixture().model), "--data", s(&data), "--samples", "3", "--resize", resize];
        let masks = dir.join(format!("masks-{resize}"));
        let predict = run(&[&["predict", "--layout", "flat", "--out", s(&masks)][..], &flags[..]].concat());
        assert!(predict.ok, "predict failed: {}", predict.stderr);
        let scores = dir.join(format!("eval-{resize}"));
        let eval = run(&[&["eval", "--batch-size", "3", "--out", s(&scores)][..], &flags[..]].concat());
        assert!(eval.ok, "eval failed: {}", eval.stderr);
        let csv = std::fs::read_to_string(scores.join("Test.csv")).unwrap();
        let (dice, counted) = (csv_column(&csv, "dice"), csv_column(&csv, "predicted_pixels"));
        assert_eq!(dice.len(), 4, "{csv}");
        for (name, scored) in &dice {
            // The flat layout names each mask like its image, with a .png extension.
            let stem = Path::new(name).file_stem().unwrap().to_str().unwrap();
            let mask = image::open(masks.join(format!("{stem}.png"))).unwrap().to_luma8();
            let truth = image::open(data.join("Test_Folder/label").join(name)).unwrap().to_luma8();
            assert_eq!(mask.dimensions(), (120, 120));
            let predicted: Vec<bool> = mask.pixels().map(|p| p[0] >= 127).collect();
            let truth: Vec<bool> = truth.pixels().map(|p| p[0] >= 127).collect();
            let written = predicted.iter().filter(|&&p| p).count();
            assert_eq!(counted[name], written.to_string(), "{resize}, {name}: eval counted other pixels");
            let dice_of_written = format!("{:.6}", mcs_engine::eval::metrics::dice(&predicted, &truth));
            assert_eq!(*scored, dice_of_written, "{resize}, {name}: eval's Dice is not the written mask's");
            pixels_by_resize.push(written);
        }
    }
    // The two resizes are told apart on these images (a flag that changed nothing would pass above).
    assert_ne!(pixels_by_resize[..4], pixels_by_resize[4..], "official and bilinear masks are the same");
}

#[test]
fn eval_prompt_sweep_reports_every_variant_and_names_missing_ones() {
    let dir = scratch("sweep");
    let data = dir.join("data");
    assert!(run(&["synth", "--out", s(&data), "--train", "1", "--val", "1", "--test", "2"]).ok);
    let prompts = data.join("Prompts_Folder");
    for variant in ["original", "contradictory", "missing_location", "overdescriptive", "underdescriptive"] {
        std::fs::copy(prompts.join("Test_text.xlsx"), prompts.join(format!("Test_text_{variant}.xlsx"))).unwrap();
    }
    let sweep = |out: &Path| {
        run(&[
            "eval",
            "--model",
            s(&fixture().model),
            "--data",
            s(&data),
            "--prompt-sweep",
            "--samples",
            "2",
            "--out",
            s(out),
        ])
    };
    let out = sweep(&dir.join("eval"));
    assert!(out.ok, "sweep failed: {}", out.stderr);
    for variant in ["original", "contradictory", "missing_location", "overdescriptive", "underdescriptive"] {
        assert!(out.stdout.lines().any(|l| l.starts_with(variant)), "no row for {variant}: {}", out.stdout);
        assert!(dir.join("eval").join(format!("{variant}.csv")).is_file());
    }
    let summary = std::fs::read_to_string(dir.join("eval/summary.json")).unwrap();
    assert_eq!(summary.matches("\"dice\"").count(), 5);

    std::fs::remove_file(prompts.join("Test_text_overdescriptive.xlsx")).unwrap();
    std::fs::remove_file(prompts.join("Test_text_contradictory.xlsx")).unwrap();
    let missing = sweep(&dir.join("eval-missing"));
    assert!(!missing.ok);
    assert!(
        missing.stderr.contains("Test_text_overdescriptive.xlsx")
            && missing.stderr.contains("Test_text_contradictory.xlsx"),
        "{}",
        missing.stderr
    );
}

/// A copy of the model folder with `edit` applied.
fn damaged_model(name: &str, edit: impl FnOnce(&Path)) -> PathBuf {
    let dir = scratch(name);
    for file in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixture().model.join(file), dir.join(file)).unwrap();
    }
    edit(&dir);
    dir
}

#[test]
fn bad_input_names_the_input_and_fails() {
    let dir = scratch("bad");
    let model = s(&fixture().model).to_string();
    let data = s(&fixture().data).to_string();
    let not_an_image = dir.join("notes.txt");
    std::fs::write(&not_an_image, "these are notes, not pixels").unwrap();
    let no_description = dir.join("no_description.csv");
    std::fs::write(&no_description, "Image,Text\nsynthetic_000007.png,a lesion\n").unwrap();
    let lists_missing = dir.join("lists_missing.csv");
    std::fs::write(&lists_missing, "Image,Description\nno_such_case.png,a lesion\n").unwrap();
    let no_weights = damaged_model("no-weights", |d| std::fs::remove_file(d.join("model.safetensors")).unwrap());
    let wider = damaged_model("wider", |d| {
        let config = std::fs::read_to_string(d.join("config.json")).unwrap();
        assert!(config.contains("\"vision_width\": 64"), "the config layout changed: {config}");
        std::fs::write(d.join("config.json"), config.replacen("\"vision_width\": 64", "\"vision_width\": 80", 1))
            .unwrap();
    });
    let tiny_tokenizer = damaged_model("tiny-tokenizer", |d| {
        let root = std::env::var_os("MCS_ROOT").filter(|r| !r.is_empty()).map(PathBuf::from);
        let tiny = root.unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()).join("weights/tiny/tokenizer.json");
        std::fs::copy(tiny, d.join("tokenizer.json")).unwrap();
    });
    let out = s(&dir.join("out")).to_string();
    let predict = |extra: &[&str]| -> Vec<String> {
        ["predict", "--out", &out].iter().chain(extra).map(|a| a.to_string()).collect()
    };
    let eval = |model: &str, extra: &[&str]| -> Vec<String> {
        ["eval", "--model", model, "--data", &data, "--samples", "1", "--out", &out]
            .iter()
            .chain(extra)
            .map(|a| a.to_string())
            .collect()
    };
    let cases: Vec<(Vec<String>, Vec<&str>)> = vec![
        (predict(&["--model", &model, "--image", s(&not_an_image)]), vec!["notes.txt", "not a readable"]),
        (predict(&["--model", &model, "--image", "no/such/case.png"]), vec!["no/such/case.png"]),
        (predict(&["--model", &model, "--prompt", "   "]), vec!["empty prompt"]),
        (
            predict(&["--model", &model, "--data", &data, "--prompts", s(&no_description)]),
            vec!["no_description.csv", "'Description'"],
        ),
        (eval(&model, &["--prompts", s(&no_description)]), vec!["no_description.csv", "'Description'"]),
        (
            predict(&["--model", &model, "--data", &data, "--prompts", s(&lists_missing)]),
            vec!["no_such_case.png", "does not exist"],
        ),
        (eval(&model, &["--prompts", s(&lists_missing)]), vec!["no_such_case.png", "does not exist"]),
        (predict(&["--model", s(&no_weights)]), vec!["missing model.safetensors"]),
        (eval(s(&no_weights), &[]), vec!["missing model.safetensors"]),
        (predict(&["--model", s(&wider)]), vec!["model.safetensors", "config.json", "vision_model"]),
        (predict(&["--model", s(&tiny_tokenizer)]), vec!["tokenizer.json", "text_vocab_size"]),
        (eval(&model, &["--threshold", "2"]), vec!["--threshold", "2 is not a probability in [0, 1]"]),
        (predict(&["--model", &model, "--samples", "0"]), vec!["at least 1"]),
    ];
    for (args, needles) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let result = run(&args);
        assert!(!result.ok, "{args:?} succeeded");
        assert!(!result.stderr.contains("panicked"), "{args:?} panicked: {}", result.stderr);
        for needle in needles {
            assert!(result.stderr.contains(needle), "{args:?}: {needle:?} not in {}", result.stderr);
        }
    }
}
