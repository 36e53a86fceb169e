//! `mcs-engine eval`: DSC, NSD, calibration and uncertainty AUROC of a model folder on a split,
//! or on the five prompt variants (`--prompt-sweep`); per-image CSV, a printed table, JSON, and
//! with `--report` one HTML page of charts and a gallery (docs/eval_report.md).

use std::path::PathBuf;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use mcs_engine::data::{self, Split};
use mcs_engine::eval::report::{self, ReportCollector, ReportSettings};
use mcs_engine::eval::{self, EvalOptions, Evaluation, Summary, NSD_TOLERANCE};
use mcs_engine::saliency::{SaliencyModel, SaliencyOptions};
use mcs_engine::segment::{select_device, Segmenter};
use mcs_engine::{Error, Result};

#[derive(clap::Args)]
pub struct EvalArgs {
    /// A model folder as `mcs-engine train` writes it, e.g. runs/train/latest. Default: the demo
    /// checkpoint weights/demo (looked for under the current directory, then under the clone that
    /// holds this executable).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Dataset folder in the official layout.
    #[arg(long)]
    data: PathBuf,
    /// The split to evaluate: Train, Val or Test.
    #[arg(long, default_value = "Test", value_parser = ["Train", "Val", "Test"])]
    split: String,
    /// Prompt file (xlsx, csv or json with Image and Description columns) instead of the split's
    /// Prompts_Folder/<Split>_text.xlsx.
    #[arg(long, conflicts_with = "prompt_sweep")]
    prompts: Option<PathBuf>,
    /// Evaluate the test split once per prompt style: Prompts_Folder/Test_text_{original,
    /// contradictory, missing_location, overdescriptive, underdescriptive}.xlsx.
    #[arg(long)]
    prompt_sweep: bool,
    #[command(flatten)]
    sampling: super::SamplingArgs,
    /// Score the zero-shot M2IB saliency's coarse masks (`mcs-engine saliency`) instead of the
    /// segmenter's masks: DSC and NSD of the coarse mask; ECE and Brier with the min-max
    /// saliency as the probability; no AUROC (there is no uncertainty map). Uses --seed and the
    /// saliency flags below; --samples, --noise, --threshold and --batch-size do not apply.
    #[arg(long)]
    zero_shot: bool,
    #[command(flatten)]
    bottleneck: super::saliency::BottleneckArgs,
    /// Images per forward pass (memory and speed only: an image's maps do not depend on the batch
    /// it is in). Default: the batch size the model was trained with. At least 1.
    #[arg(long, value_parser = super::count(), allow_negative_numbers = true)]
    batch_size: Option<usize>,
    /// NSD tolerance in pixels (a finite number above 0).
    #[arg(long, default_value_t = NSD_TOLERANCE, value_parser = super::positive::<f64>, allow_negative_numbers = true)]
    tolerance: f64,
    /// auto (the GPU when one can be used), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Folder for the per-image CSV files (<set>.csv) and summary.json.
    #[arg(long, default_value = "runs/eval")]
    out: PathBuf,
    /// Also write the summary JSON here (for scripts).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Also write <out>/report.html: one self-contained page (no network, no script) with the
    /// summary and 95 % bootstrap intervals, reliability diagram, uncertainty-error curve,
    /// Dice against uncertainty, a gallery of the worst images and, with --prompt-sweep, the
    /// table of prompt styles (docs/eval_report.md).
    #[arg(long)]
    report: bool,
    /// Gallery images of the report, the lowest Dice first (0: no gallery; at most 500; each
    /// adds tens of KB to the page).
    #[arg(long, default_value_t = eval::report::DEFAULT_GALLERY_IMAGES, requires = "report", value_parser = super::whole(0, 500), allow_negative_numbers = true)]
    report_images: usize,
}

pub fn run(args: &EvalArgs) -> Result<()> {
    let split = super::parse_split(&args.split)?;
    if args.prompt_sweep && split != Split::Test {
        return Err(Error::Invalid("--prompt-sweep evaluates the Test split; drop --split".into()));
    }
    if args.report && args.zero_shot {
        return Err(Error::Invalid(
            "--report is not available with --zero-shot: the saliency has no uncertainty map for the report's \
             uncertainty charts and gallery; drop one of them"
                .into(),
        ));
    }
    let sets = evaluation_sets(args, split)?;
    let model = super::model_or_demo(args.model.as_deref())?;
    if args.zero_shot {
        return run_zero_shot(args, split, &sets, &model);
    }
    let segmenter = Segmenter::load_on(&model, &select_device(&args.device)?)?;
    let options = EvalOptions {
        segment: args.sampling.options()?,
        batch_size: args.batch_size.unwrap_or(segmenter.config().training.batch_size),
        tolerance: args.tolerance,
    };
    segmenter.check_options(&options.segment, options.batch_size)?;
    let started = Instant::now();
    let mut summaries = Vec::with_capacity(sets.len());
    // The report details the first set (the split, or a sweep's `original` style) and keeps
    // every set's per-image scores for the intervals.
    let mut collector = args.report.then(|| ReportCollector::new(args.report_images));
    let mut evaluations = Vec::new();
    for (i, (name, prompts)) in sets.iter().enumerate() {
        let observer = if i == 0 { collector.as_mut() } else { None };
        let evaluation = evaluate_set(&segmenter, args, split, name, prompts.as_deref(), &options, observer)?;
        eval::write_records_csv(&args.out.join(format!("{name}.csv")), &evaluation.records)?;
        summaries.push(evaluation.summary.clone());
        if args.report {
            evaluations.push(evaluation);
        }
    }
    finish(args, &summaries)?;
    if let Some(collector) = &collector {
        let settings = ReportSettings {
            model: model.clone(),
            data: args.data.clone(),
            split: split.name().to_string(),
            device: segmenter.device().name(),
            options: options.clone(),
        };
        let page = report::render(&settings, &evaluations, collector, args.prompt_sweep)?;
        let path = args.out.join("report.html");
        report::write_report(&path, &page)?;
        println!("report: {} ({} KB)", path.display(), page.len().div_ceil(1024));
    }
    println!(
        "{} samples per image on {} in {:.1?}; per-image scores in {}",
        options.segment.samples,
        segmenter.device().name(),
        started.elapsed(),
        args.out.display()
    );
    Ok(())
}

/// `eval --zero-shot`: every set scored by [`eval::evaluate_zero_shot`].
fn run_zero_shot(
    args: &EvalArgs,
    split: Split,
    sets: &[(String, Option<PathBuf>)],
    model: &std::path::Path,
) -> Result<()> {
    let saliency = SaliencyModel::load_on(model, &select_device(&args.device)?)?;
    let options: SaliencyOptions = args.bottleneck.options(args.sampling.seed);
    options.check(saliency.config().vision_layers).map_err(Error::within("--layer"))?;
    let started = Instant::now();
    let mut summaries = Vec::with_capacity(sets.len());
    for (name, prompts) in sets {
        let (index, prompt_path) = open_set(args, split, prompts.as_deref())?;
        let bar = progress_bar(index.len(), name);
        let evaluation =
            eval::evaluate_zero_shot(&saliency, name, &prompt_path, &index, &options, args.tolerance, &mut |done| {
                bar.set_position(done as u64)
            });
        bar.finish_and_clear();
        let evaluation = evaluation?;
        eval::write_records_csv(&args.out.join(format!("{name}.csv")), &evaluation.records)?;
        summaries.push(evaluation.summary);
    }
    finish(args, &summaries)?;
    println!(
        "zero-shot M2IB saliency ({} steps x {} copies per image) on {} in {:.1?}; per-image scores in {}",
        options.steps,
        options.copies,
        saliency.device().name(),
        started.elapsed(),
        args.out.display()
    );
    Ok(())
}

/// The table, `summary.json` and `--json`.
fn finish(args: &EvalArgs, summaries: &[Summary]) -> Result<()> {
    print_table(summaries);
    let json = serde_json::to_string_pretty(summaries).expect("summaries always serialise");
    write_text(&args.out.join("summary.json"), &json)?;
    if let Some(path) = &args.json {
        write_text(path, &json)?;
    }
    Ok(())
}

/// The index of a set and the prompt file it was read from.
fn open_set(args: &EvalArgs, split: Split, prompts: Option<&std::path::Path>) -> Result<(data::DatasetIndex, PathBuf)> {
    let (index, unlisted) = data::open_split(&args.data, split, None, prompts)?;
    if unlisted > 0 {
        eprintln!(
            "note: {unlisted} image(s) in {}/{}/img have no prompt and are not evaluated",
            args.data.display(),
            split.folder()
        );
    }
    let prompt_path = match prompts {
        Some(path) => path.to_path_buf(),
        None => data::prompt_file_path(&args.data, split, None)?,
    };
    Ok((index, prompt_path))
}

fn progress_bar(len: usize, name: &str) -> ProgressBar {
    let bar = ProgressBar::new(len as u64);
    bar.set_style(
        ProgressStyle::with_template("eval {msg} {bar:30} {pos}/{len} images [{elapsed_precise} < {eta_precise}]")
            .expect("the progress template is valid"),
    );
    bar.set_message(name.to_string());
    bar
}

/// `(name, prompt file override)` of every set to evaluate; for a sweep, every variant file is
/// checked to exist before anything runs.
fn evaluation_sets(args: &EvalArgs, split: Split) -> Result<Vec<(String, Option<PathBuf>)>> {
    if args.prompt_sweep {
        let files = eval::prompt_variant_files(&args.data)?;
        return Ok(files.into_iter().map(|(variant, path)| (variant.to_string(), Some(path))).collect());
    }
    Ok(vec![(split.name().to_string(), args.prompts.clone())])
}

/// One set evaluated; `collector`, when given, observes every scored image for the report.
fn evaluate_set(
    segmenter: &Segmenter,
    args: &EvalArgs,
    split: Split,
    name: &str,
    prompts: Option<&std::path::Path>,
    options: &EvalOptions,
    collector: Option<&mut ReportCollector>,
) -> Result<Evaluation> {
    let (index, prompt_path) = open_set(args, split, prompts)?;
    let bar = progress_bar(index.len(), name);
    let mut progress = |done: usize| bar.set_position(done as u64);
    let evaluation = match collector {
        Some(collector) => {
            eval::evaluate_observed(segmenter, name, &prompt_path, &index, options, &mut progress, &mut |scored| {
                collector.observe(scored)
            })
        }
        None => eval::evaluate(segmenter, name, &prompt_path, &index, options, &mut progress),
    };
    bar.finish_and_clear();
    evaluation
}

fn print_table(summaries: &[Summary]) {
    println!("{:<18} {:>6} {:>8} {:>8} {:>8} {:>8} {:>8}", "set", "images", "DSC %", "NSD %", "ECE", "Brier", "AUROC");
    for s in summaries {
        let auroc = s.auroc.map_or_else(|| "-".to_string(), |a| format!("{a:.4}"));
        println!(
            "{:<18} {:>6} {:>8.2} {:>8.2} {:>8.4} {:>8.4} {:>8}",
            s.name,
            s.images,
            s.dice * 100.0,
            s.nsd * 100.0,
            s.ece,
            s.brier,
            auroc
        );
    }
}

fn write_text(path: &std::path::Path, text: &str) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(Error::io(parent))?;
    }
    mcs_engine::model::weights::write_atomically(path, text.as_bytes())
}
