//! Fuzzing the files inference reads (issue 20): arbitrary and mutated bytes through the image
//! reader ([`segment::read_image_within`]), the safetensors weight loader, the model config JSON
//! loader and the checkpoint folder loader. Every input must end in `Ok` or in an `Err` with a
//! message: no panic, no abort. Case counts are bounded so that the whole file runs in seconds.

#[path = "common/png.rs"]
mod png;

use std::path::{Path, PathBuf};

use mcs_engine::model::weights::WeightStore;
use mcs_engine::model::ModelConfig;
use mcs_engine::segment::{read_image_within, Segmenter};
use mcs_engine::tokenizer::preset_tokenizer_json;
use mcs_engine::Device;
use proptest::prelude::*;

/// The pixel limit the image cases read under: large enough for every picture here, small enough
/// that a header the fuzzer invents cannot make the decoder allocate much (1 Mi pixels, at most
/// 8 MiB of output).
const MAX_PIXELS: u64 = 1 << 20;

/// A file of this test binary holding `bytes` (one per proptest thread and case is not needed:
/// proptest runs a test's cases one after another).
fn file_with(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mcs-fuzz-inputs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// `Ok`, or an `Err` whose message is a non-empty sentence.
fn settled<T, E: std::fmt::Display>(what: &str, result: Result<T, E>) -> Result<(), TestCaseError> {
    if let Err(e) = result {
        let message = e.to_string();
        prop_assert!(!message.trim().is_empty(), "{what}: an error without a message");
    }
    Ok(())
}

/// A small picture encoded as `format`: the seed the mutations start from.
fn encoded(format: image::ImageFormat) -> Vec<u8> {
    let picture = image::RgbImage::from_fn(13, 9, |x, y| image::Rgb([(x * 19) as u8, (y * 27) as u8, 128]));
    let mut bytes = Vec::new();
    picture.write_to(&mut std::io::Cursor::new(&mut bytes), format).unwrap();
    bytes
}

/// `seed` with each `(position, byte)` written over it (positions taken modulo its length) and
/// then cut to `keep` of its bytes (at least one).
fn mutate(seed: &[u8], edits: &[(usize, u8)], keep: usize) -> Vec<u8> {
    let mut bytes = seed.to_vec();
    for &(at, value) in edits {
        let at = at % bytes.len();
        bytes[at] = value;
    }
    bytes.truncate(keep.clamp(1, bytes.len()));
    bytes
}

fn edits() -> impl Strategy<Value = Vec<(usize, u8)>> {
    prop::collection::vec((any::<usize>(), any::<u8>()), 0..8)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_are_no_image(bytes in prop::collection::vec(any::<u8>(), 0..512), prefix in 0usize..3) {
        // Behind a PNG or JPEG signature the bytes reach those decoders, not only the sniffer.
        let head: &[u8] = [&b""[..], b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"][prefix];
        let path = file_with("arbitrary.img", &[head, &bytes].concat());
        settled("arbitrary bytes", read_image_within(&path, MAX_PIXELS))?;
    }

    #[test]
    fn mutated_pngs_and_jpegs_decode_or_fail_with_a_message(
        jpeg in any::<bool>(), edits in edits(), keep in any::<usize>(),
    ) {
        let format = if jpeg { image::ImageFormat::Jpeg } else { image::ImageFormat::Png };
        let bytes = mutate(&encoded(format), &edits, keep);
        let path = file_with("mutated.img", &bytes);
        match read_image_within(&path, MAX_PIXELS) {
            Ok(image) => prop_assert_eq!(image.data.len(), image.width * image.height * 3),
            Err(e) => prop_assert!(!e.to_string().trim().is_empty(), "mutated image: an error without a message"),
        }
    }

    /// Headers with valid checksums and any size, bit depth and colour type, then pixel data of
    /// any bytes (checksummed too): the size limit and the decoder's own checks are reached.
    #[test]
    fn png_headers_of_any_size_are_refused_or_decoded_within_the_limit(
        width in prop_oneof![1u32..64, any::<u32>()], height in prop_oneof![1u32..64, any::<u32>()],
        depth in prop::sample::select(vec![1u8, 2, 4, 8, 16, 3]), colour in prop::sample::select(vec![0u8, 2, 3, 4, 6, 5]),
        data in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        let mut bytes = png::png(width, height, &[png::chunk(b"IDAT", &data)]);
        // Depth and colour type sit after the signature (8), the chunk length and kind (8) and
        // the width and height (8); the header's checksum is then recomputed.
        bytes[24] = depth;
        bytes[25] = colour;
        let crc = png::crc32(&bytes[12..29]).to_be_bytes();
        bytes[29..33].copy_from_slice(&crc);
        let path = file_with("header.png", &bytes);
        let result = read_image_within(&path, MAX_PIXELS);
        // A size over the limit is refused as too large whenever the header is otherwise valid
        // (a bad depth for the colour type, or a zero side, is an unreadable header first).
        let valid = match colour {
            0 => [1, 2, 4, 8, 16].contains(&depth),
            3 => [1, 2, 4, 8].contains(&depth),
            2 | 4 | 6 => [8, 16].contains(&depth),
            _ => false,
        };
        if valid && u64::from(width) * u64::from(height) > MAX_PIXELS {
            let message = result.as_ref().map(|_| String::new()).unwrap_or_else(|e| e.to_string());
            prop_assert!(message.contains("too large"), "{}x{}: {}", width, height, message);
        }
        settled("png header", result)?;
    }

    #[test]
    fn arbitrary_bytes_are_no_safetensors_file(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        settled("arbitrary weights", WeightStore::from_bytes(&bytes, "fuzz"))?;
    }

    /// A valid file with bytes overwritten, mostly in its 8-byte header length and its JSON
    /// header (names, dtypes, shapes, offsets), where a loader must not trust what it reads.
    #[test]
    fn mutated_safetensors_load_or_fail_with_a_message(edits in edits(), keep in any::<usize>(), in_header in any::<bool>()) {
        let seed = safetensors_file();
        let header_end = 8 + u64::from_le_bytes(seed[..8].try_into().unwrap()) as usize;
        let edits: Vec<(usize, u8)> =
            edits.into_iter().map(|(at, v)| (if in_header { at % header_end } else { at }, v)).collect();
        let bytes = mutate(&seed, &edits, keep);
        settled("mutated weights", WeightStore::from_bytes(&bytes, "fuzz"))?;
    }

    #[test]
    fn arbitrary_text_is_no_model_config(text in ".{0,200}") {
        let path = file_with("arbitrary-config.json", text.as_bytes());
        settled("arbitrary config", ModelConfig::load(&path))?;
    }

    /// The tiny preset with one size set to any number (the values a config file can hold): the
    /// checks must hold against overflow and against sizes that cannot fit in memory.
    #[test]
    fn configs_with_any_size_validate_or_fail_with_a_message(field in 0usize..SIZE_FIELDS.len(), value in size_value()) {
        let mut json = serde_json::to_value(ModelConfig::tiny()).unwrap();
        json[SIZE_FIELDS[field]] = serde_json::json!(value);
        let path = file_with("sized-config.json", json.to_string().as_bytes());
        settled("sized config", ModelConfig::load(&path))?;
    }
}

proptest! {
    // Each case loads a model folder: fewer of them.
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]

    /// A checkpoint folder (config, weights, tokenizer of the tiny preset) with one file mutated.
    #[test]
    fn mutated_checkpoint_folders_load_or_fail_with_a_message(file in 0usize..3, edits in edits(), keep in any::<usize>()) {
        let dir = std::env::temp_dir().join(format!("mcs-fuzz-inputs-{}", std::process::id())).join("folder");
        std::fs::create_dir_all(&dir).unwrap();
        let config = serde_json::to_vec_pretty(&ModelConfig::tiny()).unwrap();
        let weights = tiny_weights();
        let tokenizer = preset_tokenizer_json("tiny").unwrap().to_vec();
        let mut files = [("config.json", config), ("model.safetensors", weights), ("tokenizer.json", tokenizer)];
        files[file].1 = mutate(&files[file].1, &edits, keep);
        for (name, bytes) in &files {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
        settled("checkpoint folder", Segmenter::load_on(&dir, &Device::Cpu).map(drop))?;
    }
}

/// Config fields that size the model.
const SIZE_FIELDS: [&str; 17] = [
    "image_size",
    "patch_size",
    "vision_width",
    "vision_layers",
    "vision_heads",
    "vision_mlp_dim",
    "embed_dim",
    "text_vocab_size",
    "text_context_length",
    "text_width",
    "text_layers",
    "text_heads",
    "text_intermediate_dim",
    "text_max_positions",
    "text_type_vocab_size",
    "adapter_dim",
    "num_upscale",
];

/// Small sizes, powers of two around the overflow points, and anything.
fn size_value() -> impl Strategy<Value = u64> {
    prop_oneof![0u64..300, (0u32..64).prop_map(|k| 1u64 << k), any::<u64>()]
}

/// A small safetensors file of three F32, F16 and BF16 tensors.
fn safetensors_file() -> Vec<u8> {
    use safetensors::tensor::{Dtype, TensorView};
    let (a, b, c) = (vec![0u8; 4 * 6], vec![0u8; 2 * 4], vec![0u8; 2 * 3]);
    let tensors = [
        ("layer.weight", TensorView::new(Dtype::F32, vec![2, 3], &a).unwrap()),
        ("layer.bias", TensorView::new(Dtype::F16, vec![4], &b).unwrap()),
        ("gate", TensorView::new(Dtype::BF16, vec![3, 1], &c).unwrap()),
    ];
    safetensors::tensor::serialize(tensors, &None).unwrap()
}

/// The tiny preset's weights (random, every key the model takes) as a safetensors file, made once.
fn tiny_weights() -> Vec<u8> {
    static BYTES: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    BYTES
        .get_or_init(|| {
            let model =
                mcs_engine::model::MedClipSeg::from_store(ModelConfig::tiny(), WeightStore::synthetic(3), &Device::Cpu)
                    .unwrap();
            let tensors: Vec<(String, mcs_engine::Tensor)> =
                model.parameters().iter().map(|(k, t)| (k.clone(), t.clone())).collect();
            let path = file_with("tiny.safetensors", b"");
            mcs_engine::model::weights::save_safetensors(&path, &tensors, Default::default()).unwrap();
            std::fs::read(Path::new(&path)).unwrap()
        })
        .clone()
}
