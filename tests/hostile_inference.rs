//! Hostile input to inference (issue 20), one test per point: no result overwritten by another,
//! memory bounded and every size refused before work, every number range-checked at parse time,
//! messages that say what is true. Each feeds the bad input to the binary (or the library) and
//! checks the exit status and the message; none may end in a panic or an abort.

#[path = "common/cli.rs"]
mod cli;
#[path = "common/png.rs"]
mod png;

use std::path::{Path, PathBuf};

use cli::{run, s, Outcome};
use mcs_engine::data::synthetic;
use mcs_engine::model::weights::WeightStore;
use mcs_engine::model::{MedClipSeg, ModelConfig};
use mcs_engine::segment::{Options, Segmenter};
use mcs_engine::tokenizer::{preset_tokenizer_json, PromptTokenizer};
use mcs_engine::Device;

/// A run that failed with the CLI's error exit (1), a message holding every needle, on one
/// `error:` line, and no panic.
fn assert_refused(args: &[&str], needles: &[&str]) -> Outcome {
    let out = run(args);
    assert_eq!(out.code, Some(1), "{args:?}: expected exit 1, stderr: {}", out.stderr);
    assert_one_line_error(args, &out, needles);
    out
}

fn assert_one_line_error(args: &[&str], out: &Outcome, needles: &[&str]) {
    assert!(!out.stderr.contains("panicked"), "{args:?} panicked: {}", out.stderr);
    let errors: Vec<&str> = out.stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{args:?}: not one error line: {}", out.stderr);
    for needle in needles {
        assert!(errors[0].contains(needle), "{args:?}: {needle:?} not in {}", out.stderr);
    }
}

/// Temporary folders of this test binary.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mcs-hostile-inference-{}", std::process::id())).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Synthetic picture `id` as an RGB image.
fn picture(id: usize) -> image::RgbImage {
    let sample = synthetic::sample(666, id, 96);
    image::RgbImage::from_fn(96, 96, |x, y| {
        let (x, y) = (x as usize, y as usize);
        image::Rgb([2, 1, 0].map(|c| sample.image.get(x, y, c)))
    })
}

/// A split in the official layout holding `images` (with masks of the same names) and a CSV
/// prompt file listing `rows`; returns the dataset root and the prompt file.
fn dataset(dir: &Path, images: &[&str], rows: &[&str]) -> (PathBuf, PathBuf) {
    let root = dir.join("data");
    for folder in ["img", "label"] {
        std::fs::create_dir_all(root.join("Test_Folder").join(folder)).unwrap();
    }
    for (i, name) in images.iter().enumerate() {
        picture(2200 + i).save(root.join("Test_Folder/img").join(name)).unwrap();
        image::GrayImage::new(96, 96).save(root.join("Test_Folder/label").join(name)).unwrap();
    }
    let prompts = dir.join("prompts.csv");
    let lines: Vec<String> = rows.iter().map(|name| format!("{name},one small round lesion")).collect();
    std::fs::write(&prompts, format!("Image,Description\n{}\n", lines.join("\n"))).unwrap();
    (root, prompts)
}

const OUTPUTS: [&str; 6] =
    ["mask.png", "probability.png", "probability.npy", "uncertainty.png", "uncertainty.npy", "overlay.png"];

fn folders_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| entries.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

// 1. Nothing overwritten ---------------------------------------------------------------------

#[test]
fn images_whose_names_differ_in_the_extension_get_folders_of_their_own() {
    let dir = scratch("extensions");
    let (root, prompts) = dataset(&dir, &["a.png", "a.jpg", "b.png"], &["a.png", "a.jpg", "b.png"]);
    let out = dir.join("out");
    let args = ["predict", "--data", s(&root), "--prompts", s(&prompts), "--samples", "2", "--out", s(&out)];
    let result = run(&args);
    assert_eq!(result.code, Some(0), "{}", result.stderr);
    // As many results written as reported: a.png and a.jpg keep their extensions, b drops it.
    assert!(result.stdout.contains("3 images of Test_Folder"), "{}", result.stdout);
    assert_eq!(folders_in(&out), ["a.jpg", "a.png", "b"]);
    for folder in ["a.jpg", "a.png", "b"] {
        for file in OUTPUTS {
            assert!(out.join(folder).join(file).is_file(), "{folder}/{file} missing");
        }
    }
    // Two different pictures, two different results.
    let probability = |folder: &str| std::fs::read(out.join(folder).join("probability.npy")).unwrap();
    assert!(probability("a.png") != probability("a.jpg"), "one result overwrote the other");
}

#[test]
fn an_image_listed_twice_is_refused_before_any_work() {
    let dir = scratch("twice");
    let (root, prompts) = dataset(&dir, &["a.png", "b.png"], &["a.png", "b.png", "a.png"]);
    let out = dir.join("out");
    let args = ["predict", "--data", s(&root), "--prompts", s(&prompts), "--samples", "2", "--out", s(&out)];
    let refused = assert_refused(&args, &["a.png"]);
    let error = refused.stderr.lines().find(|l| l.starts_with("error:")).unwrap();
    assert!(error.contains("more than once") || error.contains("twice") || error.contains("row"), "{error}");
    assert!(!out.exists(), "predict wrote results before refusing: {:?}", folders_in(&out));
}

#[test]
fn out_naming_an_existing_file_is_an_error_that_leaves_the_file_alone() {
    let dir = scratch("out-file");
    let file = dir.join("results.txt");
    std::fs::write(&file, "an earlier result").unwrap();
    assert_refused(&["predict", "--samples", "2", "--out", s(&file)], &["--out", "is a file, not a folder"]);
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "an earlier result");
}

// 2. Memory bounded, sizes refused up front -----------------------------------------------------

/// A PNG that claims `width` x `height` in its header and holds no pixels: its data chunk is the
/// first two bytes of a zlib stream (a decoder reads the header up to that chunk).
fn header_only_png(dir: &Path, width: u32, height: u32) -> PathBuf {
    let path = dir.join(format!("claims-{width}x{height}.png"));
    std::fs::write(&path, png::png(width, height, &[png::chunk(b"IDAT", &[0x78, 0x01])])).unwrap();
    path
}

#[test]
fn a_too_large_image_is_refused_from_its_header_before_decoding() {
    let dir = scratch("huge");
    // 400 megapixels: decoding would need 1.2 GB before finding that the pixels are missing. The
    // refusal names the size from the header and never mentions the missing data.
    let huge = header_only_png(&dir, 20_000, 20_000);
    let refused = assert_refused(
        &["predict", "--image", s(&huge), "--prompt", "a lesion"],
        &["too large (20000x20000)", "over the limit of 100000000 pixels", "--max-pixels"],
    );
    assert!(!refused.stderr.contains("truncated"), "{}", refused.stderr);
    // The limit decides: the same kind of file under it is decoded, and reported as what it is.
    let small = header_only_png(&dir, 300, 200);
    assert_refused(&["predict", "--image", s(&small), "--prompt", "a lesion"], &["damaged or truncated"]);
    assert_refused(
        &["predict", "--image", s(&small), "--prompt", "a lesion", "--max-pixels", "59999"],
        &["too large (300x200)", "over the limit of 59999 pixels"],
    );
}

#[test]
fn max_pixels_lets_an_image_through_up_to_the_limit() {
    let dir = scratch("max-pixels");
    let image = dir.join("case.png");
    picture(2201).save(&image).unwrap();
    let out = dir.join("out");
    let args = ["predict", "--image", s(&image), "--prompt", "a lesion", "--samples", "2", "--out", s(&out)];
    let at_limit = run(&[&args[..], &["--max-pixels", "9216"]].concat()); // 96 x 96
    assert_eq!(at_limit.code, Some(0), "{}", at_limit.stderr);
    assert_refused(&[&args[..], &["--max-pixels", "9215"]].concat(), &["too large (96x96)"]);
}

#[test]
fn more_samples_than_memory_holds_are_refused_with_the_rule() {
    assert_refused(
        &["predict", "--samples", "1000000000", "--out", s(&scratch("samples"))],
        &["1000000000 Monte-Carlo samples", "do not fit in this machine's", "at most"],
    );
    assert_refused(&["bench", "predict", "--samples", "1000000000"], &["do not fit in this machine's memory"]);
}

#[test]
fn the_library_refuses_an_image_over_its_pixel_limit_before_running_the_model() {
    let config = ModelConfig::tiny();
    let tokenizer = PromptTokenizer::from_bytes(
        preset_tokenizer_json("tiny").unwrap(),
        config.text_context_length,
        config.text_pad_id,
    )
    .unwrap();
    let model = MedClipSeg::from_store(config, WeightStore::synthetic(1), &Device::Cpu).unwrap();
    let segmenter = Segmenter::new(model, tokenizer).unwrap();
    let image = synthetic::sample(1, 1, 96).image;
    let options = Options { samples: 2, max_pixels: 96 * 96 - 1, ..Options::default() };
    let error = segmenter.segment(&image, "a lesion", &options).unwrap_err().to_string();
    assert!(error.contains("too large (96x96)") && error.contains("max_pixels"), "{error}");
    let limit_zero = Options { max_pixels: 0, ..Options::default() }.check().unwrap_err().to_string();
    assert!(limit_zero.contains("at least 1 pixel"), "{limit_zero}");
    assert!(segmenter.segment(&image, "a lesion", &Options { max_pixels: 96 * 96, ..options }).is_ok());
}

/// The tiny preset with one field set to `value` (JSON).
fn tiny_with(field: &str, value: serde_json::Value) -> serde_json::Value {
    let mut config = serde_json::to_value(ModelConfig::tiny()).unwrap();
    config[field] = value;
    config
}

#[test]
fn model_configs_that_cannot_fit_are_refused_before_anything_is_allocated() {
    let huge = serde_json::json!(1u64 << 40);
    let cases = [
        // Depth: the towers run in lock-step, so both grow.
        (tiny_with("vision_layers", huge.clone()), "text_layers"),
        (
            {
                let mut c = tiny_with("vision_layers", huge.clone());
                c["text_layers"] = huge.clone();
                c
            },
            "parameter",
        ),
        // Width (kept divisible by the heads).
        (tiny_with("vision_width", serde_json::json!(1u64 << 36)), "parameter"),
        (tiny_with("text_intermediate_dim", serde_json::json!(1u64 << 62)), "overflow"),
        // Context length, with positions to match.
        (
            {
                let mut c = tiny_with("text_context_length", serde_json::json!(1u64 << 33));
                c["text_max_positions"] = serde_json::json!(1u64 << 33);
                c
            },
            "parameters need",
        ),
        // Upscaling steps: the shift that used to overflow.
        (tiny_with("num_upscale", serde_json::json!(70)), "upscale blocks take the 4-patch grid past the image size"),
        (tiny_with("num_upscale", serde_json::json!(usize::MAX)), "upscale blocks"),
    ];
    let dir = scratch("configs");
    for (i, (json, needle)) in cases.iter().enumerate() {
        let config: ModelConfig = serde_json::from_value(json.clone()).unwrap();
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains(needle), "case {i}: {needle:?} not in {error}");
        // The CLI says the same in one line and exit 1.
        let path = dir.join(format!("config-{i}.json"));
        std::fs::write(&path, json.to_string()).unwrap();
        assert_refused(&["predict", "--config", s(&path), "--samples", "1"], &[needle]);
    }
}

#[test]
fn parameter_count_is_what_the_model_loads() {
    for name in ["tiny", "small"] {
        let config = ModelConfig::preset(name).unwrap();
        let counted = config.parameter_count().unwrap();
        let model = MedClipSeg::from_store(config, WeightStore::synthetic(1), &Device::Cpu).unwrap();
        let loaded: usize = model.parameters().values().map(|t| t.numel()).sum();
        assert_eq!(counted, loaded as u64, "config {name}");
    }
}

// 3. Every number range-checked at parse time -------------------------------------------------

#[test]
fn numeric_flags_are_refused_for_their_value_at_parse_time() {
    let cases: &[(&[&str], &str)] = &[
        (&["predict", "--threshold", "-1"], "-1 is not a probability in [0, 1]"),
        (&["predict", "--threshold", "1.5"], "1.5 is not a probability in [0, 1]"),
        (&["predict", "--threshold", "nan"], "nan is not a probability in [0, 1]"),
        (&["predict", "--samples", "0"], "0 is not a whole number of at least 1"),
        (&["predict", "--samples", "-3"], "-3 is not a whole number of at least 1"),
        (&["predict", "--seed", "-1"], "invalid value '-1' for '--seed"),
        (&["predict", "--max-pixels", "0"], "at least 1 pixel"),
        (&["predict", "--max-pixels", "-5"], "`-5` is not a whole number of pixels"),
        (&["predict", "--max-pixels", "18446744073709551615"], "do not fit in this machine's memory"),
        (&["eval", "--data", "x", "--tolerance", "0"], "0 is not a finite number above 0"),
        (&["eval", "--data", "x", "--tolerance", "-2"], "-2 is not a finite number above 0"),
        (&["eval", "--data", "x", "--tolerance", "inf"], "inf is not a finite number above 0"),
        (&["eval", "--data", "x", "--batch-size", "0"], "0 is not a whole number of at least 1"),
        (&["eval", "--data", "x", "--threshold", "-0.5"], "-0.5 is not a probability in [0, 1]"),
        (&["bench", "predict", "--steps", "100001"], "100001 is not a whole number from 1 to 100000"),
        (&["bench", "predict", "--warmup", "-1"], "-1 is not a whole number from 0 to 100000"),
        (&["bench", "predict", "--threads", "5000"], "5000 is not a whole number from 0 to 1024"),
        (&["bench", "predict", "--batch-size", "-2"], "-2 is not a whole number of at least 1"),
        (&["synth", "--out", "x", "--size", "95"], "95 is not a whole number of at least 96"),
        (&["train", "--epochs", "0"], "0 is not a whole number of at least 1"),
        (&["train", "--batch-size", "-1"], "-1 is not a whole number of at least 1"),
        (&["train", "--lr", "-0.001"], "-0.001 is not a finite number above 0"),
        (&["train", "--lr", "1e39"], "1e39 is not a finite number above 0"),
        (&["train", "--text-dropout", "-0.1"], "-0.1 is not a probability in [0, 1]"),
    ];
    for (args, needle) in cases {
        let out = run(args);
        // clap's usage errors exit with 2; what matters is a refusal that names the value.
        assert!(matches!(out.code, Some(1 | 2)), "{args:?}: exit {:?}, stderr: {}", out.code, out.stderr);
        assert_one_line_error(args, &out, &[needle, "invalid value"]);
        assert!(!out.stderr.contains("unexpected argument"), "{args:?}: {}", out.stderr);
    }
}

// 4. Messages say what is true -------------------------------------------------------------

#[test]
fn a_folder_given_as_an_image_is_called_a_folder() {
    let dir = scratch("folder");
    assert_refused(&["predict", "--image", s(&dir), "--prompt", "a lesion"], &["is a folder that holds no DICOM file"]);
    // Text under an image's name, and under its own.
    let text = "plain text, not a picture";
    let (named_png, named_txt) = (dir.join("notes.png"), dir.join("notes.txt"));
    std::fs::write(&named_png, text).unwrap();
    std::fs::write(&named_txt, text).unwrap();
    assert_refused(
        &["predict", "--image", s(&named_png), "--prompt", "a lesion"],
        &["not a readable PNG or JPEG image", "signature"],
    );
    assert_refused(
        &["predict", "--image", s(&named_txt), "--prompt", "a lesion"],
        &["not a readable PNG or JPEG image", "neither PNG's nor JPEG's"],
    );
}

#[test]
fn a_truncated_image_is_called_truncated_and_a_large_one_large() {
    let dir = scratch("cut-short");
    let whole = dir.join("whole.png");
    picture(2202).save(&whole).unwrap();
    let bytes = std::fs::read(&whole).unwrap();
    let cut = dir.join("cut.png");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let refused = assert_refused(&["predict", "--image", s(&cut), "--prompt", "a lesion"], &["damaged or truncated"]);
    assert!(!refused.stderr.contains("too large"), "{}", refused.stderr);
    let huge = header_only_png(&dir, 50_000, 3_000);
    let refused =
        assert_refused(&["predict", "--image", s(&huge), "--prompt", "a lesion"], &["too large (50000x3000)"]);
    assert!(!refused.stderr.contains("truncated"), "{}", refused.stderr);
}
