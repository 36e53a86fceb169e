//! What each epoch of training measured: kept in the training state, written to `metrics.csv`
//! and drawn as a curve (`curves.png`).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::model::weights::write_atomically;

/// One row of `metrics.csv`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// 1-based.
    pub epoch: usize,
    pub learning_rate: f32,
    /// Means over the epoch's batches of the total loss and of each term.
    pub loss: f32,
    pub bce: f32,
    pub dice: f32,
    pub softcon: f32,
    /// Mean per-image Dice of the thresholded (0.5) probability of one stochastic pass.
    pub val_dice: f32,
    pub train_seconds: f32,
    pub images_per_second: f32,
}

const HEADER: &str = "epoch,learning_rate,loss,bce,dice,softcon,val_dice,train_seconds,images_per_second";

/// The records as CSV text (header first).
pub fn to_csv(records: &[EpochRecord]) -> String {
    let mut out = String::from(HEADER);
    out.push('\n');
    for r in records {
        out.push_str(&format!(
            "{},{:e},{:.6},{:.6},{:.6},{:.6},{:.6},{:.2},{:.2}\n",
            r.epoch,
            r.learning_rate,
            r.loss,
            r.bce,
            r.dice,
            r.softcon,
            r.val_dice,
            r.train_seconds,
            r.images_per_second
        ));
    }
    out
}

/// Rewrites `metrics.csv` atomically (the whole history, so a resumed run stays consistent).
pub fn write_csv(path: &Path, records: &[EpochRecord]) -> Result<()> {
    write_atomically(path, to_csv(records).as_bytes())
}
