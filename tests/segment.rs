//! The embeddable API: `Segmenter` on a model folder trained here in a second (tiny config, four
//! synthetic images), used from several threads, in batches, on inputs of other sizes, and on bad
//! input; the library example runs.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use mcs_engine::data::{self, Image8};
use mcs_engine::model::ModelConfig;
use mcs_engine::segment::{binary_entropy, full_resolution_maps, NoiseMode, Options, Segmentation, Segmenter};
use mcs_engine::tokenizer::preset_tokenizer_json;
use mcs_engine::train::{self, DataSpec, Silent, TrainOptions};
use mcs_engine::{Device, Error, Tensor};

mod common;

#[path = "../examples/segment.rs"]
mod example;

/// A model folder (`best/` of a one-epoch tiny run), trained once per test binary.
fn model_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = std::env::temp_dir().join(format!("mcs-segment-model-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        let mut config = ModelConfig::preset("tiny").unwrap();
        config.training.epochs = 1;
        config.training.batch_size = 2;
        let options = TrainOptions {
            config,
            tokenizer_json: preset_tokenizer_json("tiny").unwrap().to_vec(),
            initial_weights: None,
            data: DataSpec::Synthetic { train: 4, val: 2 },
            seed: 666,
            out: out.clone(),
            resume: false,
            device: Device::Cpu,
            workers: 0,
        };
        train::train(&options, &mut Silent).expect("tiny training runs");
        out.join(train::BEST)
    })
}

fn segmenter() -> &'static Segmenter {
    static SEGMENTER: OnceLock<Segmenter> = OnceLock::new();
    SEGMENTER.get_or_init(|| Segmenter::load_on(model_dir(), &Device::Cpu).expect("the trained folder loads"))
}

/// Synthetic ultrasound picture `id` (B, G, R) resized to `width` x `height`, with its prompt.
fn picture(id: usize, width: usize, height: usize) -> (Image8, String) {
    let sample = data::synthetic::sample(7, id, 96);
    (data::resize_linear(&sample.image, width, height).unwrap(), sample.prompt)
}

fn options(samples: usize) -> Options {
    Options { samples, ..Options::default() }
}

/// A copy of the trained folder that a test may damage.
fn scratch_copy(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mcs-segment-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for file in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(model_dir().join(file), dir.join(file)).unwrap();
    }
    dir
}

#[test]
fn segmenter_is_send_and_sync_and_threads_get_the_sequential_results() {
    fn shareable<T: Send + Sync>() {}
    shareable::<Segmenter>();

    let inputs: Vec<(Image8, String)> = (0..4).map(|i| picture(i, 80 + 7 * i, 60 + 5 * i)).collect();
    let sequential: Vec<Segmentation> =
        inputs.iter().map(|(image, prompt)| segmenter().segment(image, prompt, &options(4)).unwrap()).collect();
    // Each thread runs every input, in its own order, at the same time as the others.
    let concurrent: Vec<Vec<Segmentation>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let inputs = &inputs;
                scope.spawn(move || {
                    let mut results: Vec<(usize, Segmentation)> = (0..inputs.len())
                        .map(|k| (k + t) % inputs.len())
                        .map(|i| (i, segmenter().segment(&inputs[i].0, &inputs[i].1, &options(4)).unwrap()))
                        .collect();
                    results.sort_by_key(|(i, _)| *i);
                    results.into_iter().map(|(_, r)| r).collect()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for results in concurrent {
        assert!(results == sequential, "a concurrent call gave other maps than the sequential one");
    }
}

#[test]
fn maps_are_at_the_input_size_and_consistent() {
    let (image, prompt) = picture(1, 75, 50);
    let opts = Options { samples: 6, seed: 3, threshold: 0.4, noise: NoiseMode::Plain, ..Options::default() };
    let r = segmenter().segment(&image, &prompt, &opts).unwrap();
    assert_eq!((r.width, r.height), (75, 50));
    for map in [r.probability.len(), r.uncertainty.len(), r.mask.len()] {
        assert_eq!(map, 75 * 50);
    }
    assert_eq!(r.model_probability.len(), 32 * 32);
    for i in 0..r.mask.len() {
        let p = r.probability[i];
        assert!((0.0..=1.0).contains(&p), "probability {p}");
        assert_eq!(r.mask[i], p > 0.4, "mask and probability disagree at {i}");
        // The entropy comes from the same mean through the device ops; f32 rounding of the logs
        // differs by at most a few ulps of ln 2.
        assert!((r.uncertainty[i] - binary_entropy(p)).abs() < 1e-6, "uncertainty at {i}");
    }
    // Same seed, same maps; another seed, other maps.
    assert!(segmenter().segment(&image, &prompt, &opts).unwrap() == r);
    let other = segmenter().segment(&image, &prompt, &Options { seed: 4, ..opts.clone() }).unwrap();
    assert!(other.probability != r.probability, "the seed did not change the draws");
}

#[test]
fn antithetic_noise_is_reproducible_and_differs_from_plain_only_in_paired_draws() {
    let (image, prompt) = picture(3, 40, 40);
    let with = |samples, noise| {
        segmenter().segment(&image, &prompt, &Options { samples, noise, ..Options::default() }).unwrap()
    };
    let antithetic = with(4, NoiseMode::Antithetic);
    assert!(with(4, NoiseMode::Antithetic) == antithetic, "antithetic maps must repeat bit for bit");
    assert!(with(4, NoiseMode::Plain).probability != antithetic.probability, "the mode did not change the draws");
    // One sample has no partner: draw 0 is the same noise in both modes.
    assert!(with(1, NoiseMode::Antithetic) == with(1, NoiseMode::Plain));
}

#[test]
fn an_input_at_the_model_size_is_not_resampled() {
    let (image, prompt) = picture(2, 32, 32);
    let r = segmenter().segment(&image, &prompt, &options(3)).unwrap();
    // No resize happens, so the full-size map is the model's own map bit for bit.
    assert_eq!(r.probability, r.model_probability);
}

#[test]
fn logits_are_resized_before_the_sigmoid_and_the_mean() {
    // Two draws of a 2x2 logit map, the second twice the first; upsampled to 4x4.
    let first = [0.0f32, 4.0, 8.0, 12.0];
    let logits: Vec<f32> = first.iter().copied().chain(first.iter().map(|v| 2.0 * v)).collect();
    let logits = Tensor::from_vec(logits, &[2, 1, 2, 2]).unwrap();
    let (probability, uncertainty) = full_resolution_maps(&logits, 0, 4, 4).unwrap();
    // PyTorch bilinear (align_corners=False) of [[0, 4], [8, 12]] at 4x4: source coordinate
    // (d + 0.5) / 2 - 0.5 clamped at 0, so rows/columns sample 0, 0.25, 0.75, 1 of the way.
    let along = [0.0f32, 0.25, 0.75, 1.0];
    let sigmoid = |x: f32| 1.0 / (1.0 + (-x).exp());
    for (y, fy) in along.iter().enumerate() {
        for (x, fx) in along.iter().enumerate() {
            let b = 4.0 * fx + 8.0 * fy;
            let expected = (sigmoid(b) + sigmoid(2.0 * b)) / 2.0;
            let got = probability[y * 4 + x];
            // f32 sigmoid and mean on both sides; different operation order costs a few ulps.
            assert!((got - expected).abs() < 1e-6, "({x}, {y}): {got} vs {expected}");
            assert!((uncertainty[y * 4 + x] - binary_entropy(expected)).abs() < 1e-5);
        }
    }
    // Resizing the probability instead would give another value where the draws disagree.
    let wrong_order = (sigmoid(0.0) * 0.75 + sigmoid(4.0) * 0.25 + (sigmoid(0.0) * 0.75 + sigmoid(8.0) * 0.25)) / 2.0;
    assert!((probability[1] - wrong_order).abs() > 1e-3);
}

#[test]
fn an_image_gets_the_same_maps_alone_and_anywhere_in_any_batch() {
    let inputs: Vec<(Image8, String)> = (0..3).map(|i| picture(10 + i, 64 + 16 * i, 48 + 8 * i)).collect();
    for device in common::devices() {
        let segmenter = Segmenter::load_on(model_dir(), &device).expect("the trained folder loads");
        for noise in [NoiseMode::Plain, NoiseMode::Antithetic] {
            let options = Options { noise, ..options(6) };
            let alone: Vec<Segmentation> =
                inputs.iter().map(|(image, prompt)| segmenter.segment(image, prompt, &options).unwrap()).collect();
            // Every position of batches of 2 and 3, each image beside others: the noise is keyed by
            // the draw, not by the batch row (ItemNoise::Shared), so nothing may change, bit for bit.
            for order in [[0, 1, 2], [2, 0, 1], [1, 2, 0]] {
                for size in [2, 3] {
                    let items: Vec<(&Image8, &str)> =
                        order[..size].iter().map(|&i| (&inputs[i].0, inputs[i].1.as_str())).collect();
                    let batch = segmenter.segment_batch(&items, &options).unwrap();
                    for (position, &i) in order[..size].iter().enumerate() {
                        assert!(
                            batch[position] == alone[i],
                            "{}, {noise}: image {i} at position {position} of a batch of {size} differs from its single call",
                            device.name()
                        );
                    }
                }
            }
            // The images are told apart (a mixed-up image or prompt would not pass unnoticed).
            assert!(alone[0].model_probability != alone[1].model_probability);
        }
    }
    assert!(segmenter().segment_batch(&[], &options(2)).unwrap().is_empty());
}

#[test]
fn bad_calls_are_errors_that_say_what_is_wrong() {
    let (image, prompt) = picture(3, 40, 40);
    let message = |e: Error| e.to_string();
    let empty = message(segmenter().segment(&image, "   ", &options(2)).unwrap_err());
    assert!(empty.contains("empty prompt"), "{empty}");
    let zero = message(segmenter().segment(&image, &prompt, &options(0)).unwrap_err());
    assert!(zero.contains("at least 1"), "{zero}");
    let threshold =
        message(segmenter().segment(&image, &prompt, &Options { threshold: 1.5, ..Options::default() }).unwrap_err());
    assert!(threshold.contains("threshold 1.5"), "{threshold}");
    let four = Image8 { width: 4, height: 4, channels: 4, data: vec![0; 64] };
    let channels = message(segmenter().segment(&four, &prompt, &options(1)).unwrap_err());
    assert!(channels.contains("4 channels"), "{channels}");
    // A batch names the item at fault.
    let items = [(&image, prompt.as_str()), (&image, "")];
    let batch = message(segmenter().segment_batch(&items, &options(1)).unwrap_err());
    assert!(batch.contains("item 1") && batch.contains("empty prompt"), "{batch}");
    // A grey (one-channel) image is accepted, as cv2 would replicate it.
    let grey = Image8 { width: 40, height: 40, channels: 1, data: image.data.iter().step_by(3).copied().collect() };
    assert!(
        segmenter().segment(&grey, &prompt, &options(1)).unwrap()
            == segmenter().segment(&image, &prompt, &options(1)).unwrap()
    );
}

#[test]
fn a_bad_model_folder_names_the_file_at_fault() {
    let error = |dir: &Path| Segmenter::load_on(dir, &Device::Cpu).err().expect("loading should fail").to_string();

    let missing = std::env::temp_dir().join("mcs-no-such-model-folder");
    assert!(error(&missing).contains("mcs-no-such-model-folder"));

    let no_weights = scratch_copy("no-weights");
    std::fs::remove_file(no_weights.join("model.safetensors")).unwrap();
    let e = error(&no_weights);
    assert!(e.contains("missing model.safetensors"), "{e}");

    // The config says the image tower is wider than the weights are.
    let wider = scratch_copy("wider");
    let config = std::fs::read_to_string(wider.join("config.json")).unwrap();
    let config = config.replacen("\"vision_width\": 32", "\"vision_width\": 48", 1);
    assert!(config.contains("\"vision_width\": 48"), "the config layout changed: {config}");
    std::fs::write(wider.join("config.json"), config).unwrap();
    let e = error(&wider);
    assert!(e.contains("model.safetensors") && e.contains("config.json") && e.contains("vision_model"), "{e}");

    // A tokenizer of another vocabulary (the small preset's 68 tokens against tiny's 63).
    let other_vocab = scratch_copy("other-vocab");
    std::fs::write(other_vocab.join("tokenizer.json"), preset_tokenizer_json("small").unwrap()).unwrap();
    let e = error(&other_vocab);
    assert!(e.contains("tokenizer.json") && e.contains("text_vocab_size 63"), "{e}");

    let garbled = scratch_copy("garbled-config");
    std::fs::write(garbled.join("config.json"), "{ not json").unwrap();
    assert!(error(&garbled).contains("config.json"));

    for dir in [no_weights, wider, other_vocab, garbled] {
        std::fs::remove_dir_all(dir).unwrap();
    }
}

#[test]
fn the_library_example_runs() {
    let (image, prompt) = picture(4, 70, 90);
    let dir = std::env::temp_dir().join(format!("mcs-segment-example-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let rgb = image::RgbImage::from_fn(70, 90, |x, y| {
        let at = |c| image.get(x as usize, y as usize, c);
        image::Rgb([at(2), at(1), at(0)])
    });
    let input = dir.join("case.png");
    rgb.save(&input).unwrap();
    let result = example::run(model_dir(), &input, &prompt, &dir.join("maps")).unwrap();
    assert_eq!((result.width, result.height), (70, 90));
    for file in ["mask.png", "probability.npy", "uncertainty.png", "overlay.png"] {
        assert!(dir.join("maps").join(file).is_file(), "the example did not write {file}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}
