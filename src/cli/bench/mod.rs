//! `mcs-engine bench CASE`: end-to-end timings with random weights (`WeightStore::synthetic`),
//! one case per process so that the reported peak resident set (`VmHWM`) is that case's own.
//! `tools/bench_reference.py` runs the same cases on the PyTorch reference and prints the ratios.
//!
//! | case | file | what one timed step is |
//! |---|---|---|
//! | `train` | `train.rs` | one optimisation step: forward, losses, backward, Adam |
//! | `predict` | `predict.rs` | `--samples` Monte-Carlo draws of a batch, batched as the library does |
//! | `forward` | `predict.rs` | one inference forward pass, one sample |
//! | `attention` | `attention.rs` | the fused probabilistic attention alone, forward and forward+backward, both directions |
//! | `saliency` | `saliency.rs` | the M2IB bottleneck of one image: 10 Adam steps of 10 noise copies through the vision tower |
//!
//! Every case warms up for `--warmup` steps, then reports the median, min and max of `--steps`
//! timed steps. `Device::time` times a step from a drained queue: the host clock on the CPU, CUDA
//! events on the device's stream on a GPU (the report names the `clock`).

mod attention;
mod predict;
mod saliency;
mod train;

use mcs_engine::limits;
use mcs_engine::model::ModelConfig;
use mcs_engine::tokenizer::{preset_tokenizer_json, PromptTokenizer};
use mcs_engine::{ops, Device, Error, Result, Tensor};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// What to time: `train` (one optimisation step: forward, losses, backward, Adam);
    /// `predict` (--samples Monte-Carlo draws through the library's batched inference path:
    /// pre-processing, the deterministic prefix once, the samples stacked in the batch, mean
    /// probability and uncertainty maps; no file output); `forward` (one inference forward pass,
    /// one sample); `attention` (the fused probabilistic attention alone, forward and
    /// forward+backward, image->text and text->image at the config's shapes); `saliency` (the
    /// M2IB bottleneck of one image, as `mcs-engine saliency` runs it: 10 Adam steps of 10 noise
    /// copies, each a forward and backward pass of the vision tower from the bottleneck on).
    #[arg(value_parser = ["train", "predict", "forward", "attention", "saliency"])]
    case: String,
    /// Model config: a preset (`tiny`, `small`, `paper` = `unimedclip-vit-b16`) or a config.json path.
    #[arg(long, default_value = "small")]
    config: String,
    /// Images per step (default: the config's recipe for `train`, 1 for the other cases). At
    /// least 1; with --samples, at most what memory holds (as for `predict --samples`).
    #[arg(long, value_parser = super::count(), allow_negative_numbers = true)]
    batch_size: Option<usize>,
    /// Monte-Carlo samples for `predict` and `attention` (default 30, the paper's); `forward` is
    /// one sample and `train` follows the recipe, so neither takes it. At least 1; at most what
    /// memory holds (as for `predict --samples`).
    #[arg(long, value_parser = super::count(), allow_negative_numbers = true)]
    samples: Option<usize>,
    /// `predict` as `predict --fast` runs it: the library's quality-matched setting (8 antithetic
    /// samples, `segment::Options::fast`) instead of --samples plain ones.
    #[arg(long, conflicts_with = "samples")]
    fast: bool,
    /// Timed steps (the median and spread are over these), 1 to 100000.
    #[arg(long, default_value_t = 10, value_parser = super::whole(1, MAX_STEPS), allow_negative_numbers = true)]
    steps: usize,
    /// Untimed steps first (allocator and caches warm up), 0 to 100000.
    #[arg(long, default_value_t = 2, value_parser = super::whole(0, MAX_STEPS), allow_negative_numbers = true)]
    warmup: usize,
    /// CPU threads (rayon pool; 0 = all cores), at most 1024.
    #[arg(long, default_value_t = 0, value_parser = super::whole(0, MAX_THREADS), allow_negative_numbers = true)]
    threads: usize,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Side of the square product that measures this machine's SGEMM peak after the case (every
    /// case's matrix-product rate is printed as a fraction of it); 64 to 8192.
    #[arg(long, default_value_t = GemmPeak::DEFAULT_SIDE, value_parser = super::whole(64, 8192), allow_negative_numbers = true)]
    gemm_peak_size: usize,
    /// Add VLSM-Ensemble's CNN branch to the config (docs/cnn_branch.md); a config.json of a
    /// checkpoint with the branch has it already.
    #[arg(long)]
    cnn_branch: bool,
    /// Width factor of the CNN branch (1 = the paper's channel counts).
    #[arg(long, value_parser = super::positive::<f64>, allow_negative_numbers = true, requires = "cnn_branch")]
    cnn_width: Option<f64>,
}

/// The most steps a run may time or warm up with: a median over 100000 steps is as good as it
/// gets, and every timed step keeps its time (8 bytes) for the report.
const MAX_STEPS: usize = 100_000;

/// The most threads `--threads` may ask for: more than any machine's cores only adds a stack
/// (2 MiB of address space) and contention per thread.
const MAX_THREADS: usize = 1024;

/// What every case is given: the checked arguments, the model config and the device.
pub struct Setup<'a> {
    pub args: &'a BenchArgs,
    pub config: ModelConfig,
    pub device: Device,
}

impl Setup<'_> {
    /// `--batch-size`, or `default` when it is not given.
    fn batch(&self, default: usize) -> usize {
        self.args.batch_size.unwrap_or(default)
    }

    /// `--samples`, or the paper's 30 (`--fast`: the fast setting's count).
    fn samples(&self) -> usize {
        if self.args.fast {
            return mcs_engine::segment::Options::fast().samples;
        }
        self.args.samples.unwrap_or(30)
    }

    /// Plain draws, or `--fast`'s antithetic ones.
    fn noise(&self) -> mcs_engine::model::NoiseMode {
        if self.args.fast {
            mcs_engine::segment::Options::fast().noise
        } else {
            mcs_engine::model::NoiseMode::Plain
        }
    }
}

/// What a case reports: its own JSON fields and its text line(s), both without the common parts,
/// and each timing with its name (`run` adds their rates against the machine's GEMM peak).
pub struct Report {
    pub fields: serde_json::Map<String, serde_json::Value>,
    pub text: String,
    pub timings: Vec<(String, Timing)>,
}

/// The emulated GPU (tools/emulated_gpu.sh) runs the CUDA code on the CPU: its timings would be
/// mistaken for GPU figures. `auto` falls back to the CPU with a note; naming it is an error.
fn emulated_gpu_refused(device: Device, spec: &str) -> Result<Device> {
    if !device.is_emulated() {
        return Ok(device);
    }
    if spec == "auto" {
        eprintln!("note: the GPU here is the emulated one (tools/emulated_gpu.sh), whose timings are no GPU figures: timing the CPU");
        return Ok(Device::Cpu);
    }
    Err(Error::Invalid(format!(
        "`--device {spec}` is the emulated GPU (tools/emulated_gpu.sh): it checks the CUDA code but does not time it; \
         bench on the CPU (`--device cpu`) or on a real GPU"
    )))
}

pub fn run(args: &BenchArgs) -> Result<()> {
    check(args)?;
    if args.threads > 0 {
        rayon::ThreadPoolBuilder::new()
            .num_threads(args.threads)
            .build_global()
            .map_err(|e| Error::Invalid(format!("cannot size the thread pool to {}: {e}", args.threads)))?;
    }
    let mut config = super::load_config(preset_alias(&args.config))?;
    if args.cnn_branch {
        config.add_cnn_branch(args.cnn_width, false);
        config.validate()?;
    }
    check_memory(args, &config)?;
    let device = emulated_gpu_refused(super::parse_device(&args.device)?, &args.device)?;
    let setup = Setup { args, config, device };
    let mut report = match args.case.as_str() {
        "train" => train::run(&setup)?,
        "predict" => predict::run_predict(&setup)?,
        "forward" => predict::run_forward(&setup)?,
        "attention" => attention::run(&setup)?,
        "saliency" => saliency::run(&setup)?,
        other => return Err(Error::Invalid(format!("unknown bench case `{other}`"))),
    };
    // Read before the calibration: the high-water mark then covers set-up and every step of this
    // case, and nothing else.
    let rss = peak_rss_mib();
    let threads = rayon::current_num_threads();
    let peak = GemmPeak::measure(&setup.device, args.gemm_peak_size)?;
    let rates: Vec<serde_json::Value> = report
        .timings
        .iter()
        .map(|(name, timing)| {
            let mut entry = serde_json::Map::new();
            entry.insert("timing".into(), name.clone().into());
            entry.insert("matrix_gflop_per_step".into(), (timing.flops_per_step / 1e9).into());
            entry.insert("effective_gflop_s".into(), timing.gflop_per_s().into());
            entry.insert("fraction_of_gemm_peak".into(), (timing.gflop_per_s() / peak.gflop_per_s).into());
            serde_json::Value::Object(entry)
        })
        .collect();
    for (name, timing) in &report.timings {
        report.text.push_str(&format!(
            "\n{name}: {:.1} GFLOP of matrix products per step = {:.1} GFLOP/s, {:.0} % of the measured SGEMM peak",
            timing.flops_per_step / 1e9,
            timing.gflop_per_s(),
            100.0 * timing.gflop_per_s() / peak.gflop_per_s
        ));
    }
    report.text.push_str(&format!("\n{}", peak.text()));
    report.fields.insert("rates".into(), rates.into());
    report.fields.insert("gemm_peak".into(), peak.json());
    if args.json {
        let mut object = serde_json::Map::new();
        object.insert("case".into(), args.case.clone().into());
        object.insert("config".into(), setup.config.name.clone().into());
        let cnn_width = setup.config.cnn_branch.as_ref().map(|cnn| cnn.width);
        object.insert("cnn_branch_width".into(), cnn_width.map_or(serde_json::Value::Null, Into::into));
        object.insert("device".into(), setup.device.name().into());
        object.insert("clock".into(), setup.device.clock().into());
        object.insert("threads".into(), threads.into());
        object.insert("steps".into(), args.steps.into());
        object.insert("warmup".into(), args.warmup.into());
        object.extend(report.fields);
        // null where /proc is missing (not Linux): a reader must not mistake it for zero.
        object.insert("peak_rss_mib".into(), rss.map_or(serde_json::Value::Null, Into::into));
        println!("{}", serde_json::Value::Object(object));
    } else {
        let rss = rss.map_or_else(|| "n/a".to_string(), |mib| format!("{mib:.0} MiB"));
        let clock = setup.device.clock();
        let branch = setup
            .config
            .cnn_branch
            .as_ref()
            .map_or(String::new(), |cnn| format!(" + CNN branch (width {})", cnn.width));
        println!(
            "{}, config {}{branch} on {} ({threads} threads; clock: {clock}), {} timed steps after {} warm-up:\n{}\npeak RSS of the process: {rss}",
            args.case,
            setup.config.name,
            setup.device.name(),
            args.steps,
            args.warmup,
            report.text
        );
    }
    Ok(())
}

/// Argument errors, as sentences, before anything is built (clap has checked each number's
/// range; these are the combinations).
fn check(args: &BenchArgs) -> Result<()> {
    match (args.case.as_str(), args.samples) {
        ("forward", Some(n)) if n != 1 => {
            Err(Error::Invalid(format!("`bench forward` is one sample; use `bench predict --samples {n}`")))
        }
        (case, _) if args.fast && case != "predict" => {
            Err(Error::Invalid(format!("--fast is `predict --fast`'s setting; `bench {case}` does not take it")))
        }
        ("train", Some(_)) => Err(Error::Invalid(
            "`bench train` draws one sample per image, as training does; --samples is for predict and attention".into(),
        )),
        ("saliency", samples) if samples.is_some() || args.batch_size.is_some_and(|b| b != 1) => Err(Error::Invalid(
            "`bench saliency` times one image with the saliency defaults (10 noise copies); it takes neither \
             --samples nor --batch-size"
                .into(),
        )),
        _ => Ok(()),
    }
}

/// Errors when the case's samples x images per step would not fit in this machine's memory (the
/// rule of `predict --samples`, [`limits::max_samples`]); `train` counts one sample per image.
fn check_memory(args: &BenchArgs, config: &ModelConfig) -> Result<()> {
    let batch = args.batch_size.unwrap_or(if args.case == "train" { config.training.batch_size } else { 1 });
    let samples = match args.case.as_str() {
        "predict" | "attention" => args.samples.unwrap_or(30),
        _ => 1,
    };
    let most = limits::max_samples(config, batch);
    if samples as u64 > most {
        return Err(Error::Invalid(format!(
            "{samples} samples x {batch} images per step do not fit in this machine's memory for config `{}`: at most \
             {most} samples of {batch} images (docs/limits.md)",
            config.name
        )));
    }
    Ok(())
}

/// `paper` names the paper's preset (the and the reference script's short name).
fn preset_alias(spec: &str) -> &str {
    if spec == "paper" {
        "unimedclip-vit-b16"
    } else {
        spec
    }
}

/// The median, fastest and slowest of a case's timed steps, and every step in order, in seconds.
#[derive(Clone, Debug)]
pub struct Timing {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// Each timed step: `tools/bench_reference.py` pools them over its rounds.
    pub times: Vec<f64>,
    /// Matrix-product FLOPs per step ([`mcs_engine::ops::flops`]), averaged over every step run.
    pub flops_per_step: f64,
}

impl Timing {
    /// Runs `step(i)` for `warmup` untimed then `steps` timed iterations (`i` counts all of them),
    /// each timed by [`Device::time`].
    pub fn measure(
        device: &Device,
        warmup: usize,
        steps: usize,
        mut step: impl FnMut(usize) -> Result<()>,
    ) -> Result<Timing> {
        let mut times: Vec<f64> = Vec::with_capacity(steps);
        let flops_before = ops::flops::matrix_flops();
        for i in 0..warmup + steps {
            let seconds = device.time(|| step(i))?;
            if i >= warmup {
                times.push(seconds);
            }
        }
        // Every step does the same work, warm-up steps included.
        let flops_per_step = (ops::flops::matrix_flops() - flops_before) as f64 / (warmup + steps) as f64;
        let mut sorted = times.clone();
        sorted.sort_by(f64::total_cmp);
        // The upper median for an even count, as the train case always reported.
        Ok(Timing {
            median: sorted[sorted.len() / 2],
            min: sorted[0],
            max: sorted[sorted.len() - 1],
            times,
            flops_per_step,
        })
    }

    /// Matrix-product GFLOP/s at the median step.
    pub fn gflop_per_s(&self) -> f64 {
        self.flops_per_step / self.median / 1e9
    }

    /// `{prefix}median_s`, `{prefix}min_s`, `{prefix}max_s`, `{prefix}times_s`.
    pub fn insert(&self, fields: &mut serde_json::Map<String, serde_json::Value>, prefix: &str) {
        fields.insert(format!("{prefix}times_s"), self.times.clone().into());
        fields.insert(format!("{prefix}median_s"), self.median.into());
        fields.insert(format!("{prefix}min_s"), self.min.into());
        fields.insert(format!("{prefix}max_s"), self.max.into());
    }

    /// `median 12.3 ms (min 11.9, max 13.0)`.
    pub fn text(&self) -> String {
        format!("median {:.1} ms (min {:.1}, max {:.1})", self.median * 1e3, self.min * 1e3, self.max * 1e3)
    }
}

/// This machine's single-precision GEMM rate as the engine reaches it, the yardstick of every
/// case's effective rate: the best of [`GemmPeak::ROUNDS`] products of two
/// `side x side` matrices (`--gemm-peak-size`, default 2048) through `ops::matmul_forward` (the engine's fastest path for a large
/// square product: the `gemm` crate's AVX-512 kernel on the CPU, cuBLAS on a GPU), on the bench's
/// device and threads.
pub struct GemmPeak {
    pub gflop_per_s: f64,
    pub side: usize,
}

impl GemmPeak {
    const DEFAULT_SIDE: usize = 2048;
    const ROUNDS: usize = 5;

    pub fn measure(device: &Device, side: usize) -> Result<GemmPeak> {
        let values: Vec<f32> = (0..side * side).map(|i| ((i * 7919 % 2048) as f32 / 1024.0) - 1.0).collect();
        let a = Tensor::from_slice(&values, &[side, side], device)?;
        let b = Tensor::from_slice(&values, &[side, side], device)?;
        // One untimed product first (page faults of the output, the crate's scratch, the clock).
        let timing = Timing::measure(device, 1, Self::ROUNDS, |_| {
            std::hint::black_box(ops::matmul_forward(&a, &b, ops::MatmulOpts::default())?);
            Ok(())
        })?;
        Ok(GemmPeak { gflop_per_s: 2.0 * (side as f64).powi(3) / timing.min / 1e9, side })
    }

    fn text(&self) -> String {
        format!(
            "measured SGEMM peak: {:.1} GFLOP/s ({s} x {s} x {s} product, fastest of {} after one warm-up)",
            self.gflop_per_s,
            Self::ROUNDS,
            s = self.side
        )
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({ "gflop_s": self.gflop_per_s, "shape": [self.side, self.side, self.side], "rounds": Self::ROUNDS })
    }
}

/// The process's peak resident set in MiB (`VmHWM` of /proc/self/status), `None` where there is
/// no /proc (not Linux) or the line is missing.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_vm_hwm_kib(&status).map(|kib| kib as f64 / 1024.0)
}

/// The `VmHWM:   123456 kB` line's number.
fn parse_vm_hwm_kib(status: &str) -> Option<u64> {
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    let mut words = line["VmHWM:".len()..].split_whitespace();
    let value = words.next()?.parse().ok()?;
    (words.next() == Some("kB")).then_some(value)
}

/// Token ids of `batch` prompts, padded to the context: the preset's tokenizer on `prompts` (or a
/// fixed ten-word prompt) where one ships, else 14 arbitrary ids (the paper's BiomedBERT
/// vocabulary does not ship here; the text tower attends over the whole padded context, so which
/// ids, and how many before the padding, does not change the cost). `tools/bench_reference.py`
/// pads 14 random ids the same way.
pub fn prompt_ids(config: &ModelConfig, batch: usize, prompts: Option<&[String]>) -> Result<Vec<u32>> {
    let length = config.text_context_length;
    if let Some(json) = preset_tokenizer_json(&config.name) {
        let tokenizer = PromptTokenizer::from_bytes(json, length, config.text_pad_id)?;
        let fixed = vec!["one small round lesion in the upper left of the image".to_string(); batch];
        let prompts = prompts.unwrap_or(&fixed);
        return tokenizer.encode_batch(&prompts.iter().map(String::as_str).collect::<Vec<_>>());
    }
    Ok((0..batch * length)
        .map(
            |i| if i % length < 14 { (i * 7919 % (config.text_vocab_size - 1)) as u32 + 1 } else { config.text_pad_id },
        )
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_hwm_is_read_in_kib_and_absent_lines_give_none() {
        let status = "Name:\tmcs-engine\nVmPeak:\t  900 kB\nVmHWM:\t   20480 kB\nVmRSS:\t 100 kB\n";
        assert_eq!(parse_vm_hwm_kib(status), Some(20480));
        assert_eq!(parse_vm_hwm_kib("Name:\tx\n"), None);
        assert_eq!(parse_vm_hwm_kib("VmHWM:\t12 MB\n"), None);
        // This test runs on Linux in CI: the real file has the line.
        if std::path::Path::new("/proc/self/status").exists() {
            assert!(peak_rss_mib().is_some_and(|mib| mib > 0.0));
        }
    }

    #[test]
    fn paper_is_the_paper_preset() {
        assert_eq!(preset_alias("paper"), "unimedclip-vit-b16");
        assert_eq!(preset_alias("tiny"), "tiny");
    }
}
