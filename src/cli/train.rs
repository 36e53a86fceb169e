//! `mcs-engine train`: fine-tune (or, for the small config, train from scratch) on a dataset in
//! the official layout, or on the built-in synthetic set when no `--data` is given.

use std::path::PathBuf;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use mcs_engine::model::DiceModeName;
use mcs_engine::tokenizer::preset_tokenizer_json;
use mcs_engine::train::{self, DataSpec, EpochRecord, LossValues, Progress, TrainOptions};
use mcs_engine::{Error, Result};

#[derive(clap::Args)]
pub struct TrainArgs {
    /// Dataset folder in the official layout ({Train,Val}_Folder/{img,label}, Prompts_Folder/*.xlsx).
    /// Without it the built-in synthetic ultrasound task is generated in memory.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Model config: a preset (small, tiny, unimedclip-vit-b16) or a config.json path. The config
    /// also carries the training recipe (epochs, batch size, learning rates, loss weights).
    #[arg(long, default_value = "small")]
    config: String,
    /// Initial weights (safetensors with the official keys, e.g. a converted UniMedCLIP).
    /// Without it the model starts from random weights.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// tokenizer.json; the small and tiny presets bring their own.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Train on the official 10/25/50 % subsets (Train_text_{p}.xlsx, Val_text_{p}.xlsx).
    #[arg(long, value_parser = ["10", "25", "50", "100"])]
    data_percentage: Option<String>,
    /// Epochs (overrides the config's recipe).
    #[arg(long, value_parser = super::count(), allow_negative_numbers = true)]
    epochs: Option<usize>,
    /// Images per step (overrides the config's recipe).
    #[arg(long, value_parser = super::count(), allow_negative_numbers = true)]
    batch_size: Option<usize>,
    /// Starting learning rate, cosine-annealed per epoch to the recipe's minimum (overrides the recipe).
    #[arg(long, value_parser = super::positive::<f32>, allow_negative_numbers = true)]
    lr: Option<f32>,
    /// Soft Dice flavour: `rows` (official row-wise quirk, docs/model.md §4.1) or `image` (per image).
    #[arg(long, value_parser = ["rows", "image"])]
    dice_mode: Option<String>,
    /// Text-tower dropout while training (the official code uses 0.1).
    #[arg(long, value_parser = super::probability, allow_negative_numbers = true)]
    text_dropout: Option<f32>,
    /// Add VLSM-Ensemble's CNN branch (UNet-D) fused with the model (docs/cnn_branch.md). A
    /// config that already has one keeps its settings; a --weights file without the branch's keys
    /// starts the branch from random weights.
    #[arg(long)]
    cnn_branch: bool,
    /// Width factor of the CNN branch's channel counts (1 = the paper's 64 ... 1240 channels).
    #[arg(long, value_parser = super::positive::<f64>, allow_negative_numbers = true, requires = "cnn_branch")]
    cnn_width: Option<f64>,
    /// Apply each decoder stage's 3x3 convolution of the CNN branch twice with the same weights,
    /// as the paper's code does (needed for checkpoints of that code).
    #[arg(long, requires = "cnn_branch")]
    cnn_repeat_decoder_conv: bool,
    /// Train only the CNN branch and the fusion; MedCLIPSeg stays as loaded (the paper's recipe).
    #[arg(long, requires = "cnn_branch")]
    freeze_vlm: bool,
    /// Seed of the weights, the data order, the augmentation, the noise and the dropout.
    #[arg(long, default_value_t = 666, allow_negative_numbers = true)]
    seed: u64,
    /// Output folder: latest/ and best/ checkpoints, metrics.csv, curves.png. Created, and checked
    /// writable, before the first step.
    #[arg(long, default_value = "runs/train")]
    out: PathBuf,
    /// Continue the run in --out from its latest checkpoint. The dataset (folder, percentage, image
    /// counts), batch size, seed and model config must be the run's own; epochs may grow.
    #[arg(long)]
    resume: bool,
    /// auto (GPU when present), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Threads that load and augment images.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Size of the built-in synthetic training set.
    #[arg(long, default_value_t = 2000)]
    synthetic_train: usize,
    /// Size of the built-in synthetic validation set.
    #[arg(long, default_value_t = 200)]
    synthetic_val: usize,
}

pub fn run(args: &TrainArgs) -> Result<()> {
    let mut config = super::load_config(&args.config)?;
    let recipe = &mut config.training;
    if let Some(e) = args.epochs {
        recipe.epochs = e;
    }
    if let Some(b) = args.batch_size {
        recipe.batch_size = b;
    }
    if let Some(lr) = args.lr {
        recipe.learning_rate = lr;
        recipe.min_learning_rate = recipe.min_learning_rate.min(lr);
    }
    if let Some(mode) = &args.dice_mode {
        recipe.dice_mode = if mode == "image" { DiceModeName::Image } else { DiceModeName::Rows };
    }
    if let Some(p) = args.text_dropout {
        recipe.text_dropout = p;
    }
    if args.cnn_branch {
        config.add_cnn_branch(args.cnn_width, args.freeze_vlm).repeat_decoder_conv |= args.cnn_repeat_decoder_conv;
    }
    config.validate()?;
    let tokenizer_json = match (&args.tokenizer, preset_tokenizer_json(&config.name)) {
        (Some(path), _) => std::fs::read(path).map_err(Error::io(path))?,
        (None, Some(bytes)) => bytes.to_vec(),
        (None, None) => {
            return Err(Error::Invalid(format!(
                "config `{}` needs --tokenizer (a BERT tokenizer.json; tools/convert_checkpoint.py vocab makes one)",
                config.name
            )))
        }
    };
    let data = match &args.data {
        Some(root) => DataSpec::Folder {
            root: root.clone(),
            percentage: args
                .data_percentage
                .as_deref()
                .filter(|p| *p != "100")
                .map(|p| p.parse().expect("checked by clap")),
        },
        None => DataSpec::Synthetic { train: args.synthetic_train, val: args.synthetic_val },
    };
    let device = super::parse_device(&args.device)?;
    let options = TrainOptions {
        config,
        tokenizer_json,
        initial_weights: args.weights.clone(),
        data,
        seed: args.seed,
        out: args.out.clone(),
        resume: args.resume,
        device,
        workers: args.workers.max(1),
    };
    let r = &options.config.training;
    if let Some(cnn) = &options.config.cnn_branch {
        eprintln!(
            "with the CNN branch (width {}, fusion from vision block {}, decoder convolutions {}){}",
            cnn.width,
            cnn.resolved_vision_layer(options.config.vision_layers),
            if cnn.repeat_decoder_conv { "applied twice" } else { "applied once" },
            if args.freeze_vlm { "; MedCLIPSeg frozen" } else { "; trained jointly with MedCLIPSeg" }
        );
    }
    eprintln!(
        "training `{}` on {} for {} epochs (batch {}, lr {:e} -> {:e}, {:?} Dice, text dropout {}) on {}; writing {}",
        options.config.name,
        match &options.data {
            DataSpec::Synthetic { train, val } => format!("the synthetic task ({train} train / {val} val images)"),
            DataSpec::Folder { root, .. } | DataSpec::FolderSubset { root, .. } => root.display().to_string(),
        },
        r.epochs,
        r.batch_size,
        r.learning_rate,
        r.min_learning_rate,
        r.dice_mode,
        r.text_dropout,
        options.device.name(),
        options.out.display()
    );
    let started = Instant::now();
    let mut bars = Bars::default();
    let report = train::train(&options, &mut bars)?;
    let s = &report.state;
    println!(
        "done in {:.1?}: {} epochs, {} steps, {} trainable parameters; best validation Dice {:.4} (epoch {}), last {:.4}",
        started.elapsed(),
        s.epochs_done,
        s.steps,
        report.trainable_parameters,
        s.best_val_dice,
        s.best_epoch,
        s.records.last().map_or(f32::NAN, |r| r.val_dice)
    );
    println!(
        "text ablation: validation Dice {:.4} with each image's own prompt, {:.4} with the next image's prompt",
        s.records.last().map_or(f32::NAN, |r| r.val_dice),
        report.shifted_prompt_val_dice
    );
    println!(
        "checkpoints: {0}/latest and {0}/best (predict --model {0}/best); metrics: {0}/metrics.csv, {0}/curves.png",
        report.out.display()
    );
    Ok(())
}

/// indicatif bars: one per epoch's training batches, one for validation; a plain line per epoch
/// so logs keep the history even when the bars are hidden (not a terminal).
#[derive(Default)]
struct Bars {
    bar: Option<ProgressBar>,
    started: Option<Instant>,
    images: usize,
    loss_sum: f64,
    batches: usize,
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template).expect("a valid progress template").progress_chars("=> ")
}

impl Progress for Bars {
    fn epoch_started(&mut self, epoch: usize, epochs: usize, batches: usize) {
        let bar = ProgressBar::new(batches as u64);
        bar.set_style(style("{prefix} [{bar:30}] {pos}/{len} {msg} ETA {eta}"));
        bar.set_prefix(format!("epoch {epoch}/{epochs}"));
        self.bar = Some(bar);
        self.started = Some(Instant::now());
        (self.images, self.loss_sum, self.batches) = (0, 0.0, 0);
    }

    fn batch_done(&mut self, losses: &LossValues, images: usize) {
        self.images += images;
        self.loss_sum += losses.total as f64;
        self.batches += 1;
        if let (Some(bar), Some(started)) = (&self.bar, self.started) {
            let rate = self.images as f64 / started.elapsed().as_secs_f64().max(1e-9);
            bar.set_message(format!(
                "loss {:.4} (mean {:.4}) {rate:.1} img/s",
                losses.total,
                self.loss_sum / self.batches as f64
            ));
            bar.inc(1);
        }
    }

    fn validating(&mut self, batches: usize) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        let bar = ProgressBar::new(batches as u64);
        bar.set_style(style("  validating [{bar:30}] {pos}/{len}"));
        self.bar = Some(bar);
    }

    fn epoch_done(&mut self, r: &EpochRecord, is_best: bool) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        eprintln!(
            "epoch {:>3}: loss {:.4} (BCE {:.4}, Dice {:.4}, SoftCon {:.4}), val Dice {:.4}{}, lr {:.2e}, {:.1} img/s, {:.1} s",
            r.epoch,
            r.loss,
            r.bce,
            r.dice,
            r.softcon,
            r.val_dice,
            if is_best { " (best)" } else { "" },
            r.learning_rate,
            r.images_per_second,
            r.train_seconds
        );
    }

    fn warning(&mut self, message: &str) {
        eprintln!("warning: {message}");
    }

    fn note(&mut self, message: &str) {
        eprintln!("note: {message}");
    }
}
