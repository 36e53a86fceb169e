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
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::metrics::EpochRecord;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::model::weights::{save_safetensors, write_atomically, WeightStore};
use crate::model::{MedClipSeg, ModelConfig};
use crate::tensor::Tensor;
use crate::tokenizer::PromptTokenizer;

pub const MODEL_FILE: &str = "model.safetensors";
pub const CONFIG_FILE: &str = "config.json";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
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

/// Runs `write` on a fresh sibling folder of `dest`, then swaps it in for `dest`.
pub fn write_folder_atomically(dest: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let (parent, name) = split_folder(dest)?;
    std::fs::create_dir_all(&parent).map_err(Error::io(&parent))?;
    // Half-written folders of a run that was killed mid-save (any process id) are dropped.
    let partial_prefix = format!(".{name}.partial-");
    for entry in std::fs::read_dir(&parent).map_err(Error::io(&parent))?.flatten() {
        if entry.file_name().to_string_lossy().starts_with(&partial_prefix) {
            let stale = entry.path();
            std::fs::remove_dir_all(&stale).map_err(Error::io(&stale))?;
        }
    }
    let tmp = parent.join(format!("{partial_prefix}{}", std::process::id()));
    std::fs::create_dir(&tmp).map_err(Error::io(&tmp))?;
    if let Err(e) = write(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let old = retired_path(&parent, &name);
    if dest.exists() {
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(Error::io(&old))?;
        }
        std::fs::rename(dest, &old).map_err(Error::io(dest))?;
    }
    std::fs::rename(&tmp, dest).map_err(Error::io(dest))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(Error::io(&old))?;
    }
    Ok(())
}

fn split_folder(dest: &Path) -> Result<(PathBuf, String)> {
    let name = dest
        .file_name()
        .ok_or_else(|| Error::Invalid(format!("{}: not a folder path", dest.display())))?
        .to_string_lossy()
        .into_owned();
    let parent = dest.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
    Ok((parent, name))
}

/// Where the previous version of `name` waits while the new one is renamed in.
fn retired_path(parent: &Path, name: &str) -> PathBuf {
    parent.join(format!(".{name}.previous"))
}

/// The checkpoint folder to read for `dir`: `dir` itself, or — when a swap was cut short
/// between its two renames — the previous version kept beside it, which is moved back.
pub fn recover_folder(dir: &Path) -> Result<PathBuf> {
    if dir.is_dir() {
        return Ok(dir.to_path_buf());
    }
    let (parent, name) = split_folder(dir)?;
    let old = retired_path(&parent, &name);
    if old.is_dir() {
        std::fs::rename(&old, dir).map_err(Error::io(dir))?;
        return Ok(dir.to_path_buf());
    }
    Err(Error::Invalid(format!("{}: no such checkpoint folder", dir.display())))
}

/// A model folder read back: config, weights and tokenizer.
pub struct ModelFolder {
    pub config: ModelConfig,
    pub model: MedClipSeg,
    pub tokenizer: PromptTokenizer,
    pub tokenizer_json: Vec<u8>,
}

/// Reads `config.json`, `model.safetensors` and `tokenizer.json` of a model folder onto `device`;
/// each error names the file at fault.
pub fn load_model_folder(dir: &Path, device: &Device) -> Result<ModelFolder> {
    let dir = recover_folder(dir)?;
    let file = |name: &str| -> Result<PathBuf> {
        let path = dir.join(name);
        if path.is_file() {
            Ok(path)
        } else {
            Err(Error::Invalid(format!(
                "{}: missing {name} (a model folder holds {MODEL_FILE}, {CONFIG_FILE} and {TOKENIZER_FILE})",
                dir.display()
            )))
        }
    };
    let config = ModelConfig::load(&file(CONFIG_FILE)?)?;
    let tokenizer_path = file(TOKENIZER_FILE)?;
    let tokenizer_json = std::fs::read(&tokenizer_path).map_err(Error::io(&tokenizer_path))?;
    let tokenizer = PromptTokenizer::from_bytes(&tokenizer_json, config.text_context_length, config.text_pad_id)
        .map_err(|e| Error::Invalid(format!("{}: {e}", tokenizer_path.display())))?;
    check_tokenizer_fits(&tokenizer, &config, &tokenizer_path)?;
    let model = MedClipSeg::load(config.clone(), &file(MODEL_FILE)?, device)?;
    Ok(ModelFolder { config, model, tokenizer, tokenizer_json })
}

/// A tokenizer whose vocabulary differs from the config's would index past the embedding table
/// or silently mean other words.
pub fn check_tokenizer_fits(tokenizer: &PromptTokenizer, config: &ModelConfig, origin: &Path) -> Result<()> {
    let size = tokenizer.vocab_size();
    if size != config.text_vocab_size {
        return Err(Error::Invalid(format!(
            "{}: the tokenizer has {size} tokens but config `{}` expects text_vocab_size {}",
            origin.display(),
            config.name,
            config.text_vocab_size
        )));
    }
    Ok(())
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
