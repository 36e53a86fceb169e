//! `mcs-engine finetune-clip`: fine-tunes the vision and text towers on image-caption pairs with
//! the DHN-NCE loss (MedCLIP-SAMv2's first stage), reporting retrieval recall before and after.

use std::path::PathBuf;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use mcs_engine::data::captions::{caption_pairs_of_split, read_caption_csv};
use mcs_engine::data::Split;
use mcs_engine::eval::retrieval::Recall;
use mcs_engine::ops::DhnNceConfig;
use mcs_engine::segment::select_device;
use mcs_engine::train::clip::{self, ClipOptions, ClipProgress, ClipRecord};
use mcs_engine::train::load_model_folder;
use mcs_engine::{Error, Result};

#[derive(clap::Args)]
pub struct FinetuneClipArgs {
    /// Image-caption pairs: a CSV with `image` and `caption` columns (image paths relative to the
    /// CSV's folder), of which --val-fraction is held out for the retrieval scores.
    #[arg(long, conflicts_with = "data", required_unless_present = "data")]
    captions: Option<PathBuf>,
    /// Or a dataset in the official layout: its Train split's images with their prompts as
    /// captions, the Val split held out.
    #[arg(long)]
    data: Option<PathBuf>,
    /// The share of the CSV's pairs held out (seeded shuffle; at least one pair).
    #[arg(long, default_value_t = 0.1, value_parser = super::probability, allow_negative_numbers = true)]
    val_fraction: f32,
    /// The model folder to start from (as `predict --model`). Default: the demo checkpoint.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Train the last N blocks of each tower (and the projections); 0 trains every layer.
    #[arg(long, default_value_t = 0)]
    layers: usize,
    /// Passes over the training pairs.
    #[arg(long, default_value_t = 10, value_parser = super::count(), allow_negative_numbers = true)]
    epochs: usize,
    /// Pairs per step (at least 2: each pair's negatives are the others).
    #[arg(long, default_value_t = 32, value_parser = super::whole(2, 1 << 20), allow_negative_numbers = true)]
    batch_size: usize,
    /// Peak learning rate of AdamW, reached after the warm-up, then cosine-decayed to 0.
    #[arg(long, default_value_t = 1e-5, value_parser = super::positive::<f64>, allow_negative_numbers = true)]
    lr: f64,
    /// Warm-up steps (linear from 0 to --lr).
    #[arg(long, default_value_t = 50)]
    warmup_steps: usize,
    /// AdamW's decoupled weight decay.
    #[arg(long, default_value_t = 0.1, value_parser = non_negative, allow_negative_numbers = true)]
    weight_decay: f64,
    /// DHN-NCE temperature.
    #[arg(long, default_value_t = 0.6, value_parser = super::positive::<f32>, allow_negative_numbers = true)]
    temperature: f32,
    /// DHN-NCE hardness of the image-to-text negatives (beta1; 0 weighs every negative alike).
    #[arg(long, default_value_t = 0.15, value_parser = finite, allow_negative_numbers = true)]
    beta_image: f32,
    /// DHN-NCE hardness of the text-to-image negatives (beta2).
    #[arg(long, default_value_t = 0.15, value_parser = finite, allow_negative_numbers = true)]
    beta_text: f32,
    /// Seed of the held-out split and the data order.
    #[arg(long, default_value_t = 666, allow_negative_numbers = true)]
    seed: u64,
    /// Output folder: best/ and latest/ model folders, metrics.csv, curves.png.
    #[arg(long, default_value = "runs/finetune-clip")]
    out: PathBuf,
    /// auto (the GPU when one can be used), cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
}

fn non_negative(text: &str) -> std::result::Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
        _ => Err(format!("`{text}` is not a finite number of at least 0")),
    }
}

fn finite(text: &str) -> std::result::Result<f32, String> {
    match text.parse::<f32>() {
        Ok(v) if v.is_finite() => Ok(v),
        _ => Err(format!("`{text}` is not a finite number")),
    }
}

pub fn run(args: &FinetuneClipArgs) -> Result<()> {
    let (train, val, source) = match (&args.captions, &args.data) {
        (Some(csv), _) => {
            let pairs = read_caption_csv(csv)?;
            let (train, val) = clip::split_pairs(pairs, f64::from(args.val_fraction), args.seed)?;
            (train, val, csv.display().to_string())
        }
        (None, Some(root)) => (
            caption_pairs_of_split(root, Split::Train)?,
            caption_pairs_of_split(root, Split::Val)?,
            root.display().to_string(),
        ),
        (None, None) => return Err(Error::Invalid("pass --captions CSV or --data DIR".into())),
    };
    let device = select_device(&args.device)?;
    let dir = super::model_or_demo(args.model.as_deref())?;
    let folder = load_model_folder(&dir, &device)?;
    eprintln!(
        "fine-tuning the towers of {} ({}) on {} pairs from {source}, {} held out, on {}: {} epochs, batch {}, \
         AdamW lr {:e} (warm-up {} steps, cosine), weight decay {}, DHN-NCE tau {} betas {}/{}",
        dir.display(),
        if args.layers == 0 { "every layer".to_string() } else { format!("last {} blocks", args.layers) },
        train.len(),
        val.len(),
        device.name(),
        args.epochs,
        args.batch_size,
        args.lr,
        args.warmup_steps,
        args.weight_decay,
        args.temperature,
        args.beta_image,
        args.beta_text
    );
    let options = ClipOptions {
        train,
        val,
        layers: args.layers,
        epochs: args.epochs,
        batch_size: args.batch_size,
        learning_rate: args.lr,
        warmup_steps: args.warmup_steps,
        weight_decay: args.weight_decay,
        loss: DhnNceConfig { temperature: args.temperature, beta_image: args.beta_image, beta_text: args.beta_text },
        seed: args.seed,
        out: args.out.clone(),
    };
    let started = Instant::now();
    let mut bars = Bars::default();
    let report = clip::finetune(&folder.model, &folder.tokenizer, &folder.tokenizer_json, &options, &mut bars)?;
    let (first, last) = (&report.records[0].recall, &report.records.last().expect("epoch 0 at least").recall);
    println!(
        "done in {:.1?}: {} trainable parameters; held-out recall before -> after:\n  image->text R@1 {:.3} -> {:.3}, \
         R@5 {:.3} -> {:.3}\n  text->image R@1 {:.3} -> {:.3}, R@5 {:.3} -> {:.3}\nbest epoch {}; {}",
        started.elapsed(),
        report.trainable_parameters,
        first.image_to_text_r1,
        last.image_to_text_r1,
        first.image_to_text_r5,
        last.image_to_text_r5,
        first.text_to_image_r1,
        last.text_to_image_r1,
        first.text_to_image_r5,
        last.text_to_image_r5,
        report.best_epoch,
        clip::describe_outputs(&args.out)
    );
    Ok(())
}

fn describe(r: &Recall) -> String {
    format!(
        "i2t R@1 {:.3} R@5 {:.3}, t2i R@1 {:.3} R@5 {:.3}",
        r.image_to_text_r1, r.image_to_text_r5, r.text_to_image_r1, r.text_to_image_r5
    )
}

/// An indicatif bar per epoch and a plain line per evaluation (kept in logs).
#[derive(Default)]
struct Bars {
    bar: Option<ProgressBar>,
}

impl ClipProgress for Bars {
    fn epoch_started(&mut self, epoch: usize, epochs: usize, batches: usize) {
        let bar = ProgressBar::new(batches as u64);
        let style = ProgressStyle::with_template("epoch {prefix} [{bar:30}] {pos}/{len} steps {msg} ({eta})")
            .expect("a valid template")
            .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(format!("{epoch}/{epochs}"));
        self.bar = Some(bar);
    }

    fn batch_done(&mut self, loss: f32) {
        if let Some(bar) = &self.bar {
            bar.set_message(format!("loss {loss:.4}"));
            bar.inc(1);
        }
    }

    fn evaluated(&mut self, record: &ClipRecord, is_best: bool) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        let loss = record.loss.map_or("before fine-tuning".to_string(), |l| format!("loss {l:.4}"));
        eprintln!(
            "epoch {:>3}: {loss}, held-out {}{}",
            record.epoch,
            describe(&record.recall),
            if is_best { " (best)" } else { "" }
        );
    }
}
