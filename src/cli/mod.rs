//! One file per subcommand that has grown beyond a few lines: argument struct and the glue from
//! arguments to the library. Nothing here is needed by a library user.

pub mod bench;
pub mod check;
pub mod convert;
pub mod eval;
pub mod finetune_clip;
pub mod predict;
pub mod predict_volume;
pub mod rank;
pub mod saliency;
pub mod synth;
pub mod train;

use std::path::Path;

use mcs_engine::data::Split;
use mcs_engine::limits;
use mcs_engine::model::ModelConfig;
use mcs_engine::segment::Options;
use mcs_engine::{Device, Error, Result};

/// Keeps large freed buffers in the process instead of giving them back to the OS at once.
///
/// Every op allocates its output, and glibc serves big allocations with fresh `mmap`s (and trims
/// the heap eagerly), so each training step re-faults hundreds of megabytes of zeroed pages.
/// Raising the mmap and trim thresholds lets those buffers be reused: measured 18 % more
/// images/s for `train` on the 2-core CI machine. Other platforms keep their allocator's defaults.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const MIB: i32 = 1 << 20;
        // SAFETY: mallopt only sets allocator parameters; it is called before any other thread
        // exists, and an unsupported value is reported by a 0 return, which we may ignore.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * MIB);
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
            libc::mallopt(libc::M_TOP_PAD, 256 * MIB);
        }
    }
}

/// The Monte-Carlo sampling flags `predict` and `eval` share.
#[derive(clap::Args)]
pub struct SamplingArgs {
    /// Monte-Carlo samples per image (the paper uses 30), stacked in one batched pass. At least 1;
    /// at most what this machine's memory holds: samples x images per pass x (16 x 4 bytes x the
    /// model's largest activation of one sample) must fit in it (docs/limits.md), checked before
    /// any image is read.
    #[arg(long, default_value_t = 30, value_parser = count(), allow_negative_numbers = true)]
    samples: usize,
    /// Fewer passes for about the same uncertainty map: 8 antithetic samples (--noise antithetic
    /// --samples 8), whose map was as close to a 1000-draw reference as the official 30 plain
    /// samples' on the demo checkpoint (BENCHMARKS.md, "Quality-matched latency"); another
    /// checkpoint can differ (measure with examples/noise_error.rs).
    #[arg(long, conflicts_with_all = ["samples", "noise"])]
    fast: bool,
    /// Seed of the sampling noise: the same seed gives the same maps, bit for bit (train's --seed
    /// reproduces its validation draws).
    #[arg(long, default_value_t = 666, allow_negative_numbers = true)]
    pub seed: u64,
    /// How the Monte-Carlo draws share noise: plain (independent draws, as the official code) or
    /// antithetic (draw 2j+1 uses the negated noise of draw 2j; an odd --samples leaves the last
    /// draw unpaired). Training is not affected.
    #[arg(long, default_value = "plain", value_parser = ["plain", "antithetic"])]
    noise: String,
    /// A pixel is in the mask when its mean probability is above this (a probability, 0 to 1).
    #[arg(long, default_value_t = 0.5, value_parser = probability, allow_negative_numbers = true)]
    threshold: f32,
    /// How the mask reaches the image's own size: official (threshold the mean probability at the
    /// model's resolution, then resize that mask nearest, as the official evaluation scores it) or
    /// bilinear (threshold the full-resolution probability map: smoother outlines). `eval` scores
    /// the mask `predict` writes with the same flags. The probability and uncertainty maps are the
    /// same either way.
    #[arg(long, default_value = "official", value_parser = ["official", "bilinear"])]
    resize: String,
}

impl SamplingArgs {
    /// The segmenter's options, checked (the default image size limit; `predict --max-pixels`
    /// sets another).
    pub fn options(&self) -> Result<Options> {
        let fast = Options::fast();
        let (samples, noise) = if self.fast { (fast.samples, fast.noise) } else { (self.samples, self.noise.parse()?) };
        let options = Options {
            samples,
            seed: self.seed,
            threshold: self.threshold,
            noise,
            resize: self.resize.parse()?,
            ..Options::default()
        };
        options.check()?;
        Ok(options)
    }
}

/// clap parser of a count: a whole number, at least 1.
pub fn count() -> impl Fn(&str) -> std::result::Result<usize, String> + Clone + Send + Sync + 'static {
    whole(1, usize::MAX)
}

/// clap parser of a whole number in `least..=most` (`usize::MAX`: no bound above).
pub fn whole(
    least: usize,
    most: usize,
) -> impl Fn(&str) -> std::result::Result<usize, String> + Clone + Send + Sync + 'static {
    move |text| {
        let value = text.parse::<usize>().ok().filter(|value| (least..=most).contains(value));
        value.ok_or_else(|| match most {
            usize::MAX => format!("{text} is not a whole number of at least {least}"),
            _ => format!("{text} is not a whole number from {least} to {most}"),
        })
    }
}

/// clap parser of a probability: a number in [0, 1].
pub fn probability(text: &str) -> std::result::Result<f32, String> {
    let value: f32 = text.parse().map_err(|_| format!("`{text}` is not a number"))?;
    if !(0.0..=1.0).contains(&value) {
        return Err(format!("{text} is not a probability in [0, 1]"));
    }
    Ok(value)
}

/// clap parser of a finite number above zero (`f32` or `f64`; a value past `f32`'s range is
/// infinite, so refused).
pub fn positive<T: std::str::FromStr + Into<f64> + Copy>(text: &str) -> std::result::Result<T, String> {
    let value: T = text.parse().map_err(|_| format!("`{text}` is not a number"))?;
    let wide: f64 = value.into();
    if !(wide.is_finite() && wide > 0.0) {
        return Err(format!("{text} is not a finite number above 0"));
    }
    Ok(value)
}

/// clap parser of `predict --max-pixels`: at least 1, at most what this machine's memory holds at
/// [`limits::BYTES_PER_PIXEL`] bytes a pixel.
pub fn max_pixels(text: &str) -> std::result::Result<u64, String> {
    let value: u64 = text.parse().map_err(|_| format!("`{text}` is not a whole number of pixels"))?;
    let ceiling = limits::max_pixels_ceiling();
    if value == 0 {
        return Err("the limit must be at least 1 pixel".into());
    }
    if value > ceiling {
        return Err(format!(
            "{value} pixels at {} bytes each do not fit in this machine's memory; at most {ceiling}",
            limits::BYTES_PER_PIXEL
        ));
    }
    Ok(value)
}

/// A preset name or a config.json path.
pub fn load_config(spec: &str) -> Result<ModelConfig> {
    let path = Path::new(spec);
    if path.is_file() {
        ModelConfig::load(path)
    } else {
        ModelConfig::preset(spec)
    }
}

/// `auto` (the GPU when one can be used, else the CPU), `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(spec: &str) -> Result<Device> {
    mcs_engine::segment::select_device(spec)
}

/// `Train`, `Val` or `Test` (any case).
pub fn parse_split(name: &str) -> Result<Split> {
    Split::ALL
        .into_iter()
        .find(|s| s.name().eq_ignore_ascii_case(name))
        .ok_or_else(|| Error::Invalid(format!("unknown split `{name}`: expected Train, Val or Test")))
}

/// The checkpoint folder `predict` and `eval` use when no model is named: the demo checkpoint
/// committed in the repository (trained by the default `mcs-engine train`, see its README.md).
pub const DEMO_MODEL: &str = "weights/demo";

/// The model folder to use: `--model` when given, else the demo checkpoint (see
/// [`demo_model_dir`]), announced on stderr so nobody mistakes it for their own model.
pub fn model_or_demo(model: Option<&Path>) -> Result<std::path::PathBuf> {
    if let Some(dir) = model {
        return Ok(dir.to_path_buf());
    }
    let cwd = std::env::current_dir().ok();
    let exe = std::env::current_exe().ok().and_then(|p| p.canonicalize().ok());
    let dir = demo_model_dir(cwd.as_deref(), exe.as_deref(), Path::new(env!("CARGO_MANIFEST_DIR")))?;
    eprintln!("note: no --model given, using the demo checkpoint {} (trained on the synthetic task)", dir.display());
    Ok(dir)
}

/// Where [`DEMO_MODEL`] is, looked for in this order: under the current directory (a clone run
/// from its root), under the folders above the executable (`target/release/mcs-engine` inside a
/// clone), under the source tree the binary was built from. A folder counts when it holds
/// `model.safetensors`. Error: every path tried, and the advice to pass `--model`.
pub fn demo_model_dir(cwd: Option<&Path>, exe: Option<&Path>, manifest_dir: &Path) -> Result<std::path::PathBuf> {
    let mut tried: Vec<std::path::PathBuf> = Vec::new();
    let mut candidates: Vec<std::path::PathBuf> = Vec::new();
    if let Some(cwd) = cwd {
        candidates.push(cwd.join(DEMO_MODEL));
    }
    if let Some(exe) = exe {
        candidates.extend(exe.ancestors().skip(1).map(|folder| folder.join(DEMO_MODEL)));
    }
    candidates.push(manifest_dir.join(DEMO_MODEL));
    for dir in candidates {
        if tried.contains(&dir) {
            continue;
        }
        if dir.join(mcs_engine::train::checkpoint::MODEL_FILE).is_file() {
            return Ok(dir);
        }
        tried.push(dir);
    }
    let tried: Vec<String> = tried.iter().map(|p| p.display().to_string()).collect();
    Err(Error::Invalid(format!(
        "no --model given and the demo checkpoint {DEMO_MODEL} was not found (tried {}); pass --model DIR, a folder \
         `mcs-engine train` wrote (e.g. runs/train/best)",
        tried.join(", ")
    )))
}

/// One split that `predict` or `saliency` writes a folder per image for: the split, its index
/// and each image's output folder name.
pub struct SplitOutputs {
    pub split: Split,
    pub index: mcs_engine::data::DatasetIndex,
    pub folders: Vec<String>,
}

/// Opens `split` of `root` (with `prompts` instead of the split's own prompt file when given) and
/// refuses, before any image is processed, an empty prompt file, names that would share an output
/// folder, and images that are no images or exceed `max_pixels` (their headers alone). Images in
/// `img/` that no prompt lists are noted on stderr.
pub fn open_split_outputs(root: &Path, split: &str, prompts: Option<&Path>, max_pixels: u64) -> Result<SplitOutputs> {
    let split = parse_split(split)?;
    let (index, unlisted) = mcs_engine::data::open_split(root, split, None, prompts)?;
    if unlisted > 0 {
        eprintln!(
            "note: {unlisted} image(s) in {}/{}/img have no prompt and are skipped",
            root.display(),
            split.folder()
        );
    }
    let prompt_file = match prompts {
        Some(path) => path.to_path_buf(),
        None => mcs_engine::data::prompt_file_path(root, split, None)?,
    };
    if index.is_empty() {
        return Err(Error::Invalid(format!("{}: lists no images", prompt_file.display())));
    }
    let names: Vec<&str> = index.items.iter().map(|item| item.name.as_str()).collect();
    let folders = predict::output_folder_names(&names).map_err(Error::within(prompt_file.display().to_string()))?;
    for item in &index.items {
        mcs_engine::imaging::check_image_file(&item.image_path, max_pixels)?;
    }
    Ok(SplitOutputs { split, index, folders })
}

/// A progress bar over `len` images, labelled `what` (`predict`, `saliency`).
pub fn images_bar(what: &str, len: usize) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len as u64);
    let template = format!("{what} {{bar:30}} {{pos}}/{{len}} images [{{elapsed_precise}} < {{eta_precise}}] {{msg}}");
    bar.set_style(indicatif::ProgressStyle::with_template(&template).expect("the progress template is valid"));
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("mcs-demo-dir-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn plant_demo(root: &Path) -> std::path::PathBuf {
        let dir = root.join(DEMO_MODEL);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("model.safetensors"), b"").unwrap();
        dir
    }

    #[test]
    fn the_demo_is_found_under_the_current_directory_first_then_above_the_executable() {
        let (here, clone, elsewhere) = (scratch("here"), scratch("clone"), scratch("elsewhere"));
        let exe = clone.join("target/release/mcs-engine");
        let in_clone = plant_demo(&clone);
        // Run from somewhere else: the clone that holds the executable.
        assert_eq!(demo_model_dir(Some(&elsewhere), Some(&exe), &elsewhere).unwrap(), in_clone);
        // The current directory wins when it has one.
        let in_here = plant_demo(&here);
        assert_eq!(demo_model_dir(Some(&here), Some(&exe), &elsewhere).unwrap(), in_here);
        // Neither: the source tree the binary was built from.
        assert_eq!(demo_model_dir(Some(&elsewhere), Some(&elsewhere.join("bin/x")), &clone).unwrap(), in_clone);
        for dir in [here, clone, elsewhere] {
            std::fs::remove_dir_all(dir).unwrap();
        }
    }

    #[test]
    fn a_missing_demo_names_the_paths_tried_and_asks_for_model() {
        let (cwd, manifest) = (scratch("cwd"), scratch("manifest"));
        // A folder without weights does not count.
        std::fs::create_dir_all(cwd.join(DEMO_MODEL)).unwrap();
        let message = demo_model_dir(Some(&cwd), None, &manifest).unwrap_err().to_string();
        assert!(message.contains(&cwd.join(DEMO_MODEL).display().to_string()), "{message}");
        assert!(message.contains(&manifest.join(DEMO_MODEL).display().to_string()), "{message}");
        assert!(message.contains("pass --model"), "{message}");
        for dir in [cwd, manifest] {
            std::fs::remove_dir_all(dir).unwrap();
        }
    }
}
