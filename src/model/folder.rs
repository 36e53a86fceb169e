//! Model folders, as `mcs-engine train` and `finetune-clip` write them and `predict --model`,
//! `eval`, `saliency` and the library's `Segmenter` read them: `model.safetensors` (every
//! parameter by key), `config.json` (the config with its training recipe) and `tokenizer.json`.
//! Reading one needs nothing from training, so inference code loads models from here.

use std::path::{Path, PathBuf};

use super::{MedClipSeg, ModelConfig};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::files::recover_folder;
use crate::tokenizer::PromptTokenizer;

pub const MODEL_FILE: &str = "model.safetensors";
pub const CONFIG_FILE: &str = "config.json";
pub const TOKENIZER_FILE: &str = "tokenizer.json";

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
    read_folder(dir, device, false)
}

/// [`load_model_folder`] with every parameter of the model frozen, whatever the config's
/// `trainable` list says (inference that differentiates through the model with respect to
/// something else, such as the saliency bottleneck). `ModelFolder::config` is the file's own.
pub fn load_frozen_model_folder(dir: &Path, device: &Device) -> Result<ModelFolder> {
    read_folder(dir, device, true)
}

fn read_folder(dir: &Path, device: &Device, frozen: bool) -> Result<ModelFolder> {
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
        .map_err(Error::within(tokenizer_path.display().to_string()))?;
    check_tokenizer_fits(&tokenizer, &config, &tokenizer_path)?;
    let mut model_config = config.clone();
    if frozen {
        // The loader marks trainable exactly what this list names.
        model_config.trainable.clear();
    }
    let model = MedClipSeg::load(model_config, &file(MODEL_FILE)?, device)?;
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
