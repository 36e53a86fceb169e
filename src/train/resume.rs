//! The resume rule: `--resume` continues the same run or refuses. The run's dataset (folder with
//! symlinks resolved, data percentage, image counts) and batch size are recorded in
//! `training_state.json`; the model config is the checkpoint's `config.json`. A resume must match
//! them all, except the recipe's epochs (a run may be extended) and its other schedule and loss
//! settings (changed on purpose, and said in a note). States written before a field was recorded
//! skip that comparison with a note.

use std::path::Path;

use serde_json::Value;

use super::checkpoint::TrainingState;
use crate::error::{Error, Result};
use crate::model::ModelConfig;

/// What a run trains on and in which batches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunIdentity {
    /// The dataset folder with symlinks resolved, or `synthetic`.
    pub data_path: String,
    /// 10, 25 or 50 for an official subset, 100 for the full prompt files.
    pub data_percentage: u32,
    pub train_images: usize,
    pub val_images: usize,
    pub batch_size: usize,
}

impl RunIdentity {
    /// Writes the identity into a state (a fresh run's, or a resumed one's after the check).
    pub fn record(&self, state: &mut TrainingState) {
        state.data_path = Some(self.data_path.clone());
        state.data_percentage = Some(self.data_percentage);
        state.train_images = Some(self.train_images);
        state.val_images = Some(self.val_images);
        state.batch_size = Some(self.batch_size);
    }
}

/// One compared field: its name, the checkpoint's value (`None` when not recorded) and the
/// requested one.
type Field = (&'static str, Option<String>, String);

/// Compares a checkpoint's state with the run asked for. Error: every field that differs, with
/// both values. Ok: a note for the fields the state predates (not compared).
pub fn compare_identity(state: &TrainingState, requested: &RunIdentity, origin: &Path) -> Result<Vec<String>> {
    let text = |v: Option<usize>| v.map(|n| n.to_string());
    let fields: [Field; 5] = [
        ("data folder", state.data_path.clone(), requested.data_path.clone()),
        ("data percentage", state.data_percentage.map(|p| p.to_string()), requested.data_percentage.to_string()),
        ("training images", text(state.train_images), requested.train_images.to_string()),
        ("validation images", text(state.val_images), requested.val_images.to_string()),
        ("batch size", text(state.batch_size), requested.batch_size.to_string()),
    ];
    let differences: Vec<String> = fields
        .iter()
        .filter_map(|(name, saved, wanted)| {
            saved.as_ref().filter(|saved| *saved != wanted).map(|saved| describe(name, saved, wanted))
        })
        .collect();
    refuse_differences(origin, &differences)?;
    let unknown: Vec<&str> = fields.iter().filter(|(_, saved, _)| saved.is_none()).map(|(name, _, _)| *name).collect();
    Ok(if unknown.is_empty() {
        Vec::new()
    } else {
        vec![format!(
            "{}: the checkpoint does not record its {} (written before they were): not compared",
            origin.display(),
            unknown.join(", ")
        )]
    })
}

/// Compares the checkpoint's model config with the requested one. Error: a field of the model
/// (architecture, trainable parameters, name) that differs. Ok: a note per recipe setting that
/// changes, epochs and batch size aside (epochs may grow; the batch size is compared by
/// [`compare_identity`]).
pub fn compare_configs(saved: &ModelConfig, requested: &ModelConfig, origin: &Path) -> Result<Vec<String>> {
    let (saved, requested) = (as_object(saved), as_object(requested));
    let mut differences = Vec::new();
    let mut notes = Vec::new();
    // Both sides' keys: a part only the checkpoint has (its CNN branch) is a difference too.
    let keys: std::collections::BTreeSet<&String> = requested.keys().chain(saved.keys()).collect();
    for key in keys {
        let (wanted, had) = (requested.get(key).unwrap_or(&Value::Null), saved.get(key).unwrap_or(&Value::Null));
        if key == "training" {
            for (setting, new) in wanted.as_object().into_iter().flatten() {
                let old = had.get(setting).unwrap_or(&Value::Null);
                if old != new && setting != "epochs" && setting != "batch_size" {
                    notes.push(format!(
                        "{}: the recipe's {setting} changes from {old} (checkpoint) to {new}",
                        origin.display()
                    ));
                }
            }
        } else if had != wanted {
            differences.push(describe(&format!("config {key}"), &had.to_string(), &wanted.to_string()));
        }
    }
    refuse_differences(origin, &differences)?;
    Ok(notes)
}

fn as_object(config: &ModelConfig) -> serde_json::Map<String, Value> {
    match serde_json::to_value(config).expect("a model config always serialises") {
        Value::Object(map) => map,
        _ => unreachable!("a model config serialises as an object"),
    }
}

fn describe(field: &str, saved: &str, requested: &str) -> String {
    format!("{field} is {saved} in the checkpoint but {requested} now")
}

fn refuse_differences(origin: &Path, differences: &[String]) -> Result<()> {
    if differences.is_empty() {
        return Ok(());
    }
    Err(Error::Invalid(format!(
        "{}: --resume continues the same run, but {}; resume with the run's own data and settings, or train into \
         another --out",
        origin.display(),
        differences.join("; ")
    )))
}
