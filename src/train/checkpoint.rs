//! Checkpoint folders, as `mcs-engine train` writes them and `predict --model DIR` reads them:
//!
//! | file | holds |
//! |---|---|
//! | `model.safetensors` | every parameter under its official key (docs/model.md §9) |
//! | `config.json` | the model config and training recipe |
//! | `tokenizer.json` | the prompt tokenizer the model was trained with |
//! | `optimizer.safetensors` | Adam's moments, `m.<key>` and `v.<key>` (for `--resume`) |
//! | `training_state.json` | epochs done, step count, best Dice, the metrics so far (for `--resume`) |
//!
//! A folder is written next to its final place and swapped in by renames, so a crash leaves the
//! previous checkpoint or the new one, never a mixture; a swap cut short between its two renames
//! is repaired when the checkpoint is next read.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::metrics::EpochRecord;
use crate::error::{Error, Result};
use crate::files::write_atomically;
pub use crate::files::{recover_folder, write_folder_atomically};
pub use crate::model::folder::{
    check_tokenizer_fits, load_model_folder, ModelFolder, CONFIG_FILE, MODEL_FILE, TOKENIZER_FILE,
};
use crate::model::weights::{save_safetensors, WeightStore};
use crate::model::MedClipSeg;
use crate::tensor::Tensor;

pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "training_state.json";

/// Where a run stands after an epoch: enough to continue it exactly.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainingState {
    /// Epochs completed.
    pub epochs_done: usize,
    /// Optimiser steps taken (the noise and dropout of step `k` are drawn from `k`).
    pub steps: u64,
    pub seed: u64,
    pub best_val_dice: f32,
    pub best_epoch: usize,
    /// What the data was (`synthetic` or a folder), for people reading the file.
    pub data: String,
    pub records: Vec<EpochRecord>,
    // What `--resume` compares (src/train/resume.rs). `None` when read from a state written
    // before the field was recorded: that comparison is skipped with a note.
    /// The dataset folder with symlinks resolved, or `synthetic`.
    #[serde(default)]
    pub data_path: Option<String>,
    /// 10, 25 or 50 for an official subset, 100 for the full prompt files.
    #[serde(default)]
    pub data_percentage: Option<u32>,
    #[serde(default)]
    pub train_images: Option<usize>,
    #[serde(default)]
    pub val_images: Option<usize>,
    #[serde(default)]
    pub batch_size: Option<usize>,
}

/// Everything a checkpoint folder holds.
pub struct CheckpointContents<'a> {
    pub model: &'a MedClipSeg,
    pub tokenizer_json: &'a [u8],
    /// `(key, tensor)` pairs of the optimiser state, saved as they are.
    pub optimizer: Vec<(String, Tensor)>,
    pub state: &'a TrainingState,
}

/// Writes the checkpoint folder `dir` atomically (see the module docs).
pub fn save_checkpoint(dir: &Path, contents: &CheckpointContents) -> Result<()> {
    if contents.model.has_weights_in_panels() {
        return Err(Error::Invalid(
            "internal: a model prepared for inference (weights in panels) cannot be saved as a checkpoint".into(),
        ));
    }
    write_folder_atomically(dir, |tmp| {
        let params: Vec<(String, Tensor)> =
            contents.model.parameters().iter().map(|(k, t)| (k.clone(), t.clone())).collect();
        let metadata = HashMap::from([("format".to_string(), "mcs-engine".to_string())]);
        save_safetensors(&tmp.join(MODEL_FILE), &params, metadata)?;
        contents.model.config().save(&tmp.join(CONFIG_FILE))?;
        write_atomically(&tmp.join(TOKENIZER_FILE), contents.tokenizer_json)?;
        save_safetensors(&tmp.join(OPTIMIZER_FILE), &contents.optimizer, HashMap::new())?;
        let state = serde_json::to_string_pretty(contents.state).expect("the training state always serialises");
        write_atomically(&tmp.join(STATE_FILE), state.as_bytes())
    })
}

/// Reads what `--resume` needs from a checkpoint folder: the optimiser tensors and the state.
pub fn load_training_state(dir: &Path) -> Result<(BTreeMap<String, Tensor>, TrainingState)> {
    let dir = recover_folder(dir)?;
    let state_path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&state_path).map_err(Error::io(&state_path))?;
    let state: TrainingState = serde_json::from_str(&text)
        .map_err(|e| Error::Invalid(format!("{}: not a training state: {e}", state_path.display())))?;
    let optimizer_path = dir.join(OPTIMIZER_FILE);
    let store = WeightStore::load(&optimizer_path)?;
    Ok((store.into_tensors(), state))
}
