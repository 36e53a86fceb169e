//! `mcs-engine rank --simulate`: does labelling the images `rank` puts first help more than
//! labelling random ones? Per seed: train on a random 10 % of the Train split, rank the rest with
//! that model, add the top 15 % (ranked arm) or a random 15 % (random arm), fine-tune the first
//! model on each labelled set with the same recipe, and compare validation Dice (docs/rank.md §4).

use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use mcs_engine::data::{self, PromptedImage, Split};
use mcs_engine::segment::rank::{ranking_order, RankBy};
use mcs_engine::segment::{select_device, Options, Segmenter};
use mcs_engine::tokenizer::preset_tokenizer_json;
use mcs_engine::train::{self, DataSpec, EpochRecord, Progress, TrainOptions};
use mcs_engine::{Device, Error, Result};
use serde::Serialize;

use super::{sampling_options, score_images, write_ranking_csv, RankArgs};

/// Monte-Carlo samples of the pool's ranking when `--samples` is not given: the pool is ranked
/// once per seed, and 10 draws keep that to about a minute per seed on two CPU cores.
const SIMULATION_SAMPLES: usize = 10;

/// Keys the random split of the Train split into the first labelled set and the pool, apart from
/// every training shuffle of the same seed.
const SUBSET_TAG: u64 = 0x5241_4E4B_5355_4253; // "RANKSUBS"

#[derive(clap::Args)]
pub struct SimulationArgs {
    /// Run the experiment instead of ranking: on --data (a labelled dataset in the official
    /// layout; default: the synthetic task, written into --out/data) train on a random
    /// --initial-percent of the Train split, rank the rest, add the top --add-percent (ranked
    /// arm) or a random --add-percent (random arm), fine-tune the first model on each, compare
    /// validation Dice on the Val split; once per seed. Writes simulation.csv and
    /// simulation.json into --out (docs/rank.md).
    #[arg(long)]
    pub simulate: bool,
    /// Seeds to repeat the experiment over: --seed, --seed + 1, ...
    #[arg(long, default_value_t = 3, value_parser = super::super::count(), requires = "simulate")]
    seeds: usize,
    /// Model config of the runs: a preset with its own tokenizer (small, tiny) or a config.json
    /// path.
    #[arg(long, default_value = "small", requires = "simulate")]
    config: String,
    /// Epochs of the first model, trained from random weights on the first labelled set.
    #[arg(long, default_value_t = 20, value_parser = super::super::count(), requires = "simulate")]
    epochs: usize,
    /// Epochs of each arm's fine-tuning from the first model (the same recipe for both arms:
    /// the config's learning rate, cosine-annealed again over these epochs).
    #[arg(long, default_value_t = 10, value_parser = super::super::count(), requires = "simulate")]
    finetune_epochs: usize,
    /// Share of the Train split labelled at the start, in percent.
    #[arg(long, default_value_t = 10, value_parser = super::super::whole(1, 98), requires = "simulate")]
    initial_percent: usize,
    /// Share of the Train split each arm adds, in percent.
    #[arg(long, default_value_t = 15, value_parser = super::super::whole(1, 98), requires = "simulate")]
    add_percent: usize,
    /// Training images of the synthetic task (without --data).
    #[arg(long, default_value_t = 1000, value_parser = super::super::count(), requires = "simulate", conflicts_with = "data")]
    synthetic_train: usize,
    /// Validation images of the synthetic task (without --data).
    #[arg(long, default_value_t = 200, value_parser = super::super::count(), requires = "simulate", conflicts_with = "data")]
    synthetic_val: usize,
    /// Threads that load and augment training images.
    #[arg(long, default_value_t = 2, value_parser = super::super::count(), requires = "simulate")]
    workers: usize,
}

/// One seed's outcome.
#[derive(Clone, Debug, Serialize)]
struct SeedResult {
    seed: u64,
    /// Validation Dice of the first model (trained on the first labelled set).
    initial_dice: f64,
    ranked_dice: f64,
    random_dice: f64,
    /// `ranked_dice - random_dice`.
    difference: f64,
    /// Images both arms added.
    shared_picks: usize,
    seconds: f64,
}

/// Mean and sample standard deviation over seeds (`None` for one seed).
#[derive(Clone, Debug, Serialize)]
struct Spread {
    mean: f64,
    std: Option<f64>,
}

impl Spread {
    fn of(values: impl Iterator<Item = f64> + Clone) -> Spread {
        let n = values.clone().count();
        let mean = values.clone().sum::<f64>() / n.max(1) as f64;
        let std = (n > 1).then(|| (values.map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt());
        Spread { mean, std }
    }

    fn show(&self) -> String {
        match self.std {
            Some(std) => format!("{:.4} ± {std:.4}", self.mean),
            None => format!("{:.4}", self.mean),
        }
    }
}

/// Everything simulation.json holds.
#[derive(Serialize)]
struct Simulation {
    data: String,
    config: String,
    device: String,
    initial_epochs: usize,
    finetune_epochs: usize,
    /// How each arm is retrained.
    retraining: &'static str,
    train_images: usize,
    initial_images: usize,
    added_images: usize,
    val_images: usize,
    ranked_by: &'static str,
    samples: usize,
    noise: String,
    threshold: f32,
    seeds: Vec<SeedResult>,
    initial_dice: Spread,
    ranked_dice: Spread,
    random_dice: Spread,
    difference: Spread,
    /// Seeds where the ranked arm's Dice is above the random arm's.
    ranked_better: usize,
    wall_seconds: f64,
}

/// What every seed shares.
struct Plan<'a> {
    root: PathBuf,
    out: PathBuf,
    train_items: Vec<data::Item>,
    initial: usize,
    added: usize,
    config: mcs_engine::model::ModelConfig,
    tokenizer_json: Vec<u8>,
    device: Device,
    options: Options,
    by: RankBy,
    args: &'a RankArgs,
}

pub fn run(args: &RankArgs) -> Result<()> {
    let started = Instant::now();
    let sim = &args.simulation;
    let out = args.out.clone().unwrap_or_else(|| PathBuf::from("runs/rank-simulation"));
    refuse_used_folder(&out)?;
    let options = sampling_options(args, SIMULATION_SAMPLES)?;
    let by = RankBy::parse(&args.by)?;
    let config = super::super::load_config(&sim.config)?;
    let tokenizer_json = preset_tokenizer_json(&config.name)
        .ok_or_else(|| {
            Error::Invalid(format!(
                "--config {}: the simulation trains from random weights and needs a preset with its own tokenizer \
                 (small or tiny)",
                sim.config
            ))
        })?
        .to_vec();
    let device = select_device(&args.device)?;
    let root = match &args.data {
        Some(root) => root.clone(),
        None => {
            let root = out.join("data");
            eprintln!(
                "writing the synthetic task ({} train / {} val images, seed {}) into {}",
                sim.synthetic_train,
                sim.synthetic_val,
                args.seed,
                root.display()
            );
            data::write_official_layout(&root, args.seed, 96, sim.synthetic_train, sim.synthetic_val, 0)?;
            root
        }
    };
    let train_items = distinct_items(data::open_split(&root, Split::Train, None, None)?.0);
    let val_images = data::open_split(&root, Split::Val, None, None)?.0.len();
    let (initial, added) = budget(train_items.len(), sim.initial_percent, sim.add_percent, &root)?;
    let plan =
        Plan { root, out: out.clone(), train_items, initial, added, config, tokenizer_json, device, options, by, args };
    eprintln!(
        "simulation on {}: {} training images, {} labelled at the start, {} added per arm (by {} with {} samples, \
         or at random), config `{}` ({} + {} fine-tuning epochs), {} seed(s), on {}",
        plan.root.display(),
        plan.train_items.len(),
        initial,
        added,
        by.name(),
        plan.options.samples,
        plan.config.name,
        sim.epochs,
        sim.finetune_epochs,
        sim.seeds,
        plan.device.name()
    );
    let mut results = Vec::with_capacity(sim.seeds);
    for k in 0..sim.seeds {
        let result = run_seed(&plan, args.seed.wrapping_add(k as u64))?;
        eprintln!(
            "seed {}: initial {:.4}, ranked {:.4}, random {:.4} ({:+.4}) in {:.0} s",
            result.seed, result.initial_dice, result.ranked_dice, result.random_dice, result.difference, result.seconds
        );
        results.push(result);
    }
    let simulation = Simulation {
        data: plan.root.display().to_string(),
        config: plan.config.name.clone(),
        device: plan.device.name(),
        initial_epochs: sim.epochs,
        finetune_epochs: sim.finetune_epochs,
        retraining: "fine-tuned from the first model, the same recipe for both arms",
        train_images: plan.train_items.len(),
        initial_images: initial,
        added_images: added,
        val_images,
        ranked_by: by.name(),
        samples: plan.options.samples,
        noise: args.noise.clone(),
        threshold: plan.options.threshold,
        initial_dice: Spread::of(results.iter().map(|r| r.initial_dice)),
        ranked_dice: Spread::of(results.iter().map(|r| r.ranked_dice)),
        random_dice: Spread::of(results.iter().map(|r| r.random_dice)),
        difference: Spread::of(results.iter().map(|r| r.difference)),
        ranked_better: results.iter().filter(|r| r.difference > 0.0).count(),
        seeds: results,
        wall_seconds: started.elapsed().as_secs_f64(),
    };
    write_results(&out, &simulation)?;
    print_table(&simulation);
    println!("{0}/simulation.csv, {0}/simulation.json; runs and rankings in {0}/seed_*", out.display());
    Ok(())
}

/// One seed: the first model, the pool's ranking, both arms.
fn run_seed(plan: &Plan, seed: u64) -> Result<SeedResult> {
    let started = Instant::now();
    let sim = &plan.args.simulation;
    let folder = plan.out.join(format!("seed_{seed}"));
    let order = data::epoch_order(plan.train_items.len(), seed, SUBSET_TAG, true);
    let labelled: Vec<usize> = order[..plan.initial].to_vec();
    // The pool in name order, so the ranking's last tie-break (input order) does not follow the shuffle.
    let mut pool: Vec<usize> = order[plan.initial..].to_vec();
    pool.sort_unstable();
    // The random arm takes the next images of the seed's shuffle: a uniform draw from the pool.
    let random_picks: Vec<usize> = order[plan.initial..plan.initial + plan.added].to_vec();

    let first = folder.join("initial");
    let first_report = train_run(plan, seed, &labelled, None, sim.epochs, &first, "initial")?;
    let first_model = first.join(train::LATEST);

    let segmenter = Segmenter::load_on(&first_model, &plan.device)?;
    let pool_images: Vec<PromptedImage> = pool
        .iter()
        .map(|&i| {
            let item = &plan.train_items[i];
            PromptedImage { name: item.name.clone(), image_path: item.image_path.clone(), prompt: item.prompt.clone() }
        })
        .collect();
    let options = Options { seed, ..plan.options.clone() };
    segmenter.check_options(&options, plan.args.batch_size.min(pool_images.len()))?;
    let bar = super::super::images_bar(&format!("seed {seed}: rank"), pool_images.len());
    let scores =
        score_images(&segmenter, &pool_images, &options, plan.args.batch_size, &|done| bar.set_position(done as u64));
    bar.finish_and_clear();
    let scores = scores?;
    let ranking = ranking_order(&scores, plan.by);
    write_ranking_csv(&folder.join("ranking.csv"), &pool_images, &scores, &ranking)?;
    let ranked_picks: Vec<usize> = ranking[..plan.added].iter().map(|&r| pool[r]).collect();
    drop(segmenter);

    let weights = first_model.join(train::checkpoint::MODEL_FILE);
    let mut arms = Vec::new();
    for (name, picks) in [("ranked", &ranked_picks), ("random", &random_picks)] {
        let set: Vec<usize> = labelled.iter().chain(picks.iter()).copied().collect();
        arms.push(train_run(plan, seed, &set, Some(&weights), sim.finetune_epochs, &folder.join(name), name)?);
    }
    let shared_picks = ranked_picks.iter().filter(|i| random_picks.contains(i)).count();
    let (ranked_dice, random_dice) = (arms[0], arms[1]);
    Ok(SeedResult {
        seed,
        initial_dice: first_report,
        ranked_dice,
        random_dice,
        difference: ranked_dice - random_dice,
        shared_picks,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Trains on the Train items `set` (from `weights`, or random weights) for `epochs` into `out`;
/// returns the validation Dice of the final model (the last epoch's, not the best: no model is
/// chosen on the split it is scored on).
fn train_run(
    plan: &Plan,
    seed: u64,
    set: &[usize],
    weights: Option<&Path>,
    epochs: usize,
    out: &Path,
    label: &str,
) -> Result<f64> {
    let mut config = plan.config.clone();
    config.training.epochs = epochs;
    let options = TrainOptions {
        config,
        tokenizer_json: plan.tokenizer_json.clone(),
        initial_weights: weights.map(Path::to_path_buf),
        data: DataSpec::FolderSubset {
            root: plan.root.clone(),
            train_images: set.iter().map(|&i| plan.train_items[i].name.clone()).collect(),
        },
        seed,
        out: out.to_path_buf(),
        resume: false,
        device: plan.device.clone(),
        workers: plan.args.simulation.workers,
    };
    let mut progress = RunBar::new(format!("seed {seed}: {label}"));
    let report = train::train(&options, &mut progress);
    progress.finish();
    let report = report.map_err(|e| Error::Invalid(format!("seed {seed}, {label} model ({}): {e}", out.display())))?;
    let last =
        report.state.records.last().ok_or_else(|| Error::Invalid(format!("{}: trained no epoch", out.display())))?;
    Ok(f64::from(last.val_dice))
}

/// Refuses an `--out` that is a file or a folder with anything in it: the runs inside must start
/// afresh, and an earlier simulation's results must not be lost.
fn refuse_used_folder(out: &Path) -> Result<()> {
    if out.exists() && !out.is_dir() {
        return Err(Error::Invalid(format!("--out {}: is a file; the simulation writes a folder", out.display())));
    }
    if out.is_dir() && std::fs::read_dir(out).map_err(Error::io(out))?.next().is_some() {
        return Err(Error::Invalid(format!(
            "--out {}: already holds files (an earlier simulation?); choose a new folder",
            out.display()
        )));
    }
    std::fs::create_dir_all(out).map_err(Error::io(out))
}

/// The split's items with each image once (a prompt file may list an image twice; the first row
/// counts).
fn distinct_items(index: data::DatasetIndex) -> Vec<data::Item> {
    let mut seen = std::collections::HashSet::new();
    index.items.into_iter().filter(|item| seen.insert(item.name.clone())).collect()
}

/// Images labelled at the start and added per arm, each at least one. Error: a split too small
/// for the pool to hold more than one arm's additions (both arms would take the whole pool).
fn budget(images: usize, initial_percent: usize, add_percent: usize, root: &Path) -> Result<(usize, usize)> {
    let share = |percent: usize| ((images * percent) as f64 / 100.0).round().max(1.0) as usize;
    let (initial, added) = (share(initial_percent), share(add_percent));
    if initial + added >= images {
        return Err(Error::Invalid(format!(
            "{}: the Train split has {images} images; {initial} labelled at the start and {added} added per arm leave \
             no choice between the arms (use a larger split or smaller --initial-percent / --add-percent)",
            root.display()
        )));
    }
    Ok((initial, added))
}

/// simulation.csv (one row per seed, then `mean` and `std` rows) and simulation.json, atomically.
fn write_results(out: &Path, simulation: &Simulation) -> Result<()> {
    let path = out.join("simulation.csv");
    let failed = |e: csv::Error| Error::Invalid(format!("{}: cannot format the CSV: {e}", path.display()));
    let mut writer = csv::Writer::from_writer(Vec::new());
    writer
        .write_record(["seed", "initial_dice", "ranked_dice", "random_dice", "difference", "shared_picks"])
        .map_err(failed)?;
    for r in &simulation.seeds {
        let row = [
            r.seed.to_string(),
            format!("{:.6}", r.initial_dice),
            format!("{:.6}", r.ranked_dice),
            format!("{:.6}", r.random_dice),
            format!("{:.6}", r.difference),
            r.shared_picks.to_string(),
        ];
        writer.write_record(&row).map_err(failed)?;
    }
    let spreads = [&simulation.initial_dice, &simulation.ranked_dice, &simulation.random_dice, &simulation.difference];
    let mean: Vec<String> = spreads.iter().map(|s| format!("{:.6}", s.mean)).collect();
    let std: Vec<String> = spreads.iter().map(|s| s.std.map_or(String::new(), |v| format!("{v:.6}"))).collect();
    for (name, values) in [("mean", mean), ("std", std)] {
        let row: Vec<String> = std::iter::once(name.to_string()).chain(values).chain([String::new()]).collect();
        writer.write_record(&row).map_err(failed)?;
    }
    let bytes = writer.into_inner().map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
    mcs_engine::files::write_atomically(&path, &bytes)?;
    let json = serde_json::to_string_pretty(simulation).expect("the simulation always serialises");
    mcs_engine::files::write_atomically(&out.join("simulation.json"), json.as_bytes())
}

fn print_table(s: &Simulation) {
    println!(
        "validation Dice after adding {} images to {} (of {}) by {} or at random ({}):",
        s.added_images, s.initial_images, s.train_images, s.ranked_by, s.retraining
    );
    println!("{:>8} {:>10} {:>10} {:>10} {:>11} {:>7}", "seed", "initial", "ranked", "random", "difference", "shared");
    for r in &s.seeds {
        println!(
            "{:>8} {:>10.4} {:>10.4} {:>10.4} {:>+11.4} {:>7}",
            r.seed, r.initial_dice, r.ranked_dice, r.random_dice, r.difference, r.shared_picks
        );
    }
    println!(
        "mean ± std over {} seed(s): initial {}, ranked {}, random {}, difference {}; ranked above random in {} of {}; \
         {:.0} s",
        s.seeds.len(),
        s.initial_dice.show(),
        s.ranked_dice.show(),
        s.random_dice.show(),
        s.difference.show(),
        s.ranked_better,
        s.seeds.len(),
        s.wall_seconds
    );
}

/// One bar per training epoch over its batches, and a line per epoch with its validation Dice.
struct RunBar {
    label: String,
    bar: Option<ProgressBar>,
}

impl RunBar {
    fn new(label: String) -> RunBar {
        RunBar { label, bar: None }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

impl Progress for RunBar {
    fn epoch_started(&mut self, epoch: usize, epochs: usize, batches: usize) {
        self.finish();
        let bar = ProgressBar::new(batches as u64);
        let style = ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} batches ETA {eta}")
            .expect("the progress template is valid");
        bar.set_style(style);
        bar.set_prefix(format!("{} epoch {epoch}/{epochs}", self.label));
        self.bar = Some(bar);
    }

    fn batch_done(&mut self, _losses: &train::LossValues, _images: usize) {
        if let Some(bar) = &self.bar {
            bar.inc(1);
        }
    }

    fn epoch_done(&mut self, record: &EpochRecord, _is_best: bool) {
        self.finish();
        eprintln!(
            "{} epoch {}: loss {:.4}, val Dice {:.4}, {:.0} img/s",
            self.label, record.epoch, record.loss, record.val_dice, record.images_per_second
        );
    }

    fn warning(&mut self, message: &str) {
        eprintln!("warning: {message}");
    }

    fn note(&mut self, message: &str) {
        eprintln!("note: {message}");
    }
}
