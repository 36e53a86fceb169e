//! Prompt text -> token ids, as the official UniMedCLIP `HFTokenizer` does (docs/model.md §1.2): clean the
//! text (HTML entities, whitespace), run the BERT WordPiece tokenizer from a `tokenizer.json`,
//! truncate to the context length keeping `[CLS]` and `[SEP]`, pad with the pad id.

use std::path::Path;

use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use crate::error::{Error, Result};

pub struct PromptTokenizer {
    inner: Tokenizer,
    context_length: usize,
}

/// `tokenizer.json`'s bytes as a `tokenizers` tokenizer. The JSON's syntax is checked first:
/// `tokenizers` 0.22 panics (instead of returning an error) on some damaged files, e.g. one cut
/// short inside its `decoder` section, which the fuzz tests found. A panic that still escapes it
/// is turned into an error too, so a damaged file is never a crash.
fn parse_tokenizer_json(bytes: &[u8]) -> Result<Tokenizer> {
    let unreadable = |why: String| Error::Invalid(format!("not a readable tokenizer.json: {why}"));
    serde_json::from_slice::<serde::de::IgnoredAny>(bytes).map_err(|e| unreadable(e.to_string()))?;
    match std::panic::catch_unwind(|| Tokenizer::from_bytes(bytes)) {
        Ok(parsed) => parsed.map_err(|e| unreadable(e.to_string())),
        Err(_) => Err(unreadable("the tokenizers library could not parse it".into())),
    }
}

impl PromptTokenizer {
    /// Loads a Hugging Face `tokenizer.json` and fixes padding/truncation to `context_length`.
    pub fn load(path: &Path, context_length: usize, pad_id: u32) -> Result<PromptTokenizer> {
        let bytes = std::fs::read(path).map_err(Error::io(path))?;
        Self::from_bytes(&bytes, context_length, pad_id).map_err(Error::within(path.display().to_string()))
    }

    pub fn from_bytes(bytes: &[u8], context_length: usize, pad_id: u32) -> Result<PromptTokenizer> {
        let mut inner = parse_tokenizer_json(bytes)?;
        let pad_token = inner.id_to_token(pad_id).unwrap_or_else(|| "[PAD]".to_string());
        inner
            .with_truncation(Some(TruncationParams { max_length: context_length, ..Default::default() }))
            .map_err(|e| Error::Invalid(format!("cannot truncate to {context_length} tokens: {e}")))?;
        inner.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(context_length),
            pad_id,
            pad_token,
            ..Default::default()
        }));
        Ok(PromptTokenizer { inner, context_length })
    }

    /// Tokens in the vocabulary, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn context_length(&self) -> usize {
        self.context_length
    }

    /// Exactly `context_length` ids for one prompt. An empty prompt is an error: a segmentation
    /// prompt must say what to segment.
    pub fn encode(&self, prompt: &str) -> Result<Vec<u32>> {
        let cleaned = clean_prompt(prompt);
        if cleaned.is_empty() {
            return Err(Error::Invalid("empty prompt: say what to segment, e.g. \"a polyp in the image\"".into()));
        }
        let encoding = self
            .inner
            .encode(cleaned.as_str(), true)
            .map_err(|e| Error::Invalid(format!("cannot tokenize prompt {prompt:?}: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Ids for a batch of prompts, concatenated (`B * context_length`).
    pub fn encode_batch(&self, prompts: &[&str]) -> Result<Vec<u32>> {
        let mut ids = Vec::with_capacity(prompts.len() * self.context_length);
        for prompt in prompts {
            ids.extend(self.encode(prompt)?);
        }
        Ok(ids)
    }
}

/// The `tokenizer.json` shipped for a built-in config (`tiny`, `small`); the paper config's
/// BiomedBERT vocabulary comes with its converted checkpoint instead.
pub fn preset_tokenizer_json(config_name: &str) -> Option<&'static [u8]> {
    match config_name {
        "tiny" => Some(include_bytes!("../weights/tiny/tokenizer.json")),
        "small" => Some(include_bytes!("../weights/small/tokenizer.json")),
        _ => None,
    }
}

/// The official cleaning minus ftfy's mojibake repair: HTML entities unescaped, whitespace runs
/// collapsed to one space, ends trimmed (so a prompt's trailing newline disappears).
pub fn clean_prompt(text: &str) -> String {
    let unescaped = text
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&apos;", "'")
        .replace("&nbsp;", " ")
        .replace("&amp;", "&");
    unescaped.split_whitespace().collect::<Vec<_>>().join(" ")
}
