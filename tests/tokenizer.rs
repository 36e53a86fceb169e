//! Prompt tokenization against the Hugging Face `tokenizers` library's output for the tiny
//! vocabulary (`tests/fixtures/tiny_tokens.json`, written by tools/make_fixtures.py).

mod common;

use mcs_engine::model::ModelConfig;
use mcs_engine::tokenizer::{clean_prompt, PromptTokenizer};

const TOKENIZER: &str = "weights/tiny/tokenizer.json";
const CASES: &str = "tests/fixtures/tiny_tokens.json";

fn tokenizer() -> PromptTokenizer {
    let c = ModelConfig::tiny();
    PromptTokenizer::load(&common::repo_file(TOKENIZER), c.text_context_length, c.text_pad_id).unwrap()
}

#[test]
fn ids_match_hugging_face_padding_and_truncation() {
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(common::repo_file(CASES)).unwrap()).unwrap();
    let tokenizer = tokenizer();
    let mut checked = 0;
    for case in &cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        if clean_prompt(text).is_empty() {
            // The engine refuses an empty prompt instead of segmenting "nothing".
            let err = tokenizer.encode(text).unwrap_err().to_string();
            assert!(err.contains("empty prompt"), "{err}");
            continue;
        }
        assert_eq!(tokenizer.encode(text).unwrap(), want, "prompt {text:?}");
        checked += 1;
    }
    assert!(checked >= 8, "only {checked} prompts compared");
}

#[test]
fn cleaning_unescapes_html_and_collapses_whitespace() {
    assert_eq!(clean_prompt("  a &amp; b\n\tc &lt;d&gt;\n"), "a & b c <d>");
    assert_eq!(clean_prompt("&amp;lt;"), "&lt;");
}

#[test]
fn batch_encoding_concatenates_fixed_length_rows() {
    let tokenizer = tokenizer();
    let ids = tokenizer.encode_batch(&["a red circle", "no lesion"]).unwrap();
    assert_eq!(ids.len(), 2 * tokenizer.context_length());
    assert_eq!(ids[0], ids[tokenizer.context_length()], "both rows start with [CLS]");
}

#[test]
fn a_missing_tokenizer_file_is_named_in_the_error() {
    let err = PromptTokenizer::load("no/such/tokenizer.json".as_ref(), 16, 0).err().unwrap().to_string();
    assert!(err.contains("no/such/tokenizer.json"), "{err}");
}

/// A `tokenizer.json` cut short anywhere in its `decoder` section (where `tokenizers` 0.22 panics
/// rather than erring, found by tests/fuzz_inputs.rs), or corrupted there, is an error, never a
/// panic.
#[test]
fn a_damaged_tokenizer_json_is_an_error_not_a_panic() {
    let json = mcs_engine::tokenizer::preset_tokenizer_json("tiny").unwrap();
    let config = ModelConfig::tiny();
    let decoder = json.windows(9).position(|w| w == b"\"decoder\"").expect("the tiny tokenizer has a decoder");
    for cut in decoder..(decoder + 160).min(json.len()) {
        let result = std::panic::catch_unwind(|| {
            PromptTokenizer::from_bytes(&json[..cut], config.text_context_length, config.text_pad_id).map(drop)
        });
        let error = result.unwrap_or_else(|_| panic!("cut at byte {cut}: the tokenizer parser panicked"));
        let message = error.expect_err("a cut file is refused").to_string();
        assert!(message.contains("not a readable tokenizer.json"), "cut at byte {cut}: {message}");
    }
}
