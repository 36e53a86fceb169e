//! The zero-shot M2IB saliency (src/saliency/): the objective's gradient with respect to the
//! bottleneck by finite differences on the tiny model, the model is frozen, k-means and connected
//! components on hand-made maps, SAM prompts inside their components, and GPU against CPU for one
//! image's map.

mod common;

use common::{assert_close, gpu, random_vec};
use mcs_engine::data::Image8;
use mcs_engine::model::weights::WeightStore;
use mcs_engine::model::{MedClipSeg, ModelConfig};
use mcs_engine::ops;
use mcs_engine::saliency::{
    component_mask, default_layer, kmeans_two, largest_components, m2ib_objective, min_max_normalise, sam_prompt,
    SaliencyModel, SaliencyOptions,
};
use mcs_engine::tokenizer::{preset_tokenizer_json, PromptTokenizer};
use mcs_engine::{Device, Tape, Tensor};

const WEIGHTS: &str = "tests/fixtures/tiny_weights.safetensors";

fn tiny_model(device: &Device, frozen: bool) -> MedClipSeg {
    let mut config = ModelConfig::tiny();
    if frozen {
        config.trainable.clear();
    }
    MedClipSeg::from_store(config, WeightStore::load(&common::repo_file(WEIGHTS)).unwrap(), device).unwrap()
}

fn tiny_tokenizer() -> PromptTokenizer {
    let config = ModelConfig::tiny();
    PromptTokenizer::from_bytes(preset_tokenizer_json("tiny").unwrap(), config.text_context_length, config.text_pad_id)
        .unwrap()
}

/// A B, G, R picture with a bright disc on a darker, textured background.
fn picture(width: usize, height: usize) -> Image8 {
    let texture = random_vec(11, width * height, 0.0, 40.0);
    let mut data = Vec::with_capacity(width * height * 3);
    for y in 0..height {
        for x in 0..width {
            let (dx, dy) = (x as f32 - 0.3 * width as f32, y as f32 - 0.6 * height as f32);
            let disc = if dx * dx + dy * dy < (0.2 * width as f32).powi(2) { 160.0 } else { 40.0 };
            let v = (disc + texture[y * width + x]) as u8;
            data.extend([v, v, v]);
        }
    }
    Image8 { width, height, channels: 3, data }
}

// ---------------------------------------------------------------------------------------------
// (a) The objective's gradient

#[test]
fn the_objective_gradient_matches_finite_differences() {
    let model = tiny_model(&Device::Cpu, true);
    let config = model.config().clone();
    let layer = default_layer(config.vision_layers);
    assert_eq!(layer, 2, "round(7/12 * 4)");
    let frozen = Tape::inference();
    let size = config.image_size;
    let pixels = Tensor::from_vec(random_vec(1, 3 * size * size, -2.0, 2.0), &[1, 3, size, size]).unwrap();
    let x = model.vision_tokens_after(&frozen, &pixels, layer).unwrap();
    let (t, w) = (x.dim(1), x.dim(2));
    let text = model.text_embedding(&frozen, &tiny_tokenizer().encode("a bright round lesion").unwrap()).unwrap();
    // Two copies: the mean over the batch is exercised, and the test stays fast.
    let noise = ops::normal_noise(&Device::Cpu, &[2, t, w], 7, 0).unwrap();
    // Logits around 0, where sigmoid bends most, rather than the start value 5 where lambda is
    // nearly flat and every gradient is a few 1e-7: the same ops, a harder test.
    let alpha0 = random_vec(2, t * w, -2.0, 2.0);
    let beta = 0.1;
    let objective = |alpha: &[f32]| -> f64 {
        let alpha = Tensor::from_vec(alpha.to_vec(), &[t, w]).unwrap();
        let value = m2ib_objective(&model, &Tape::inference(), &x, &alpha, &noise, &text, layer, beta).unwrap();
        f64::from(value.to_scalar().unwrap())
    };

    let tape = Tape::new();
    let alpha = Tensor::from_vec(alpha0.clone(), &[t, w]).unwrap().into_trainable();
    let loss = m2ib_objective(&model, &tape, &x, &alpha, &noise, &text, layer, beta).unwrap();
    assert_eq!(loss.shape(), [1]);
    assert_eq!(f64::from(loss.to_scalar().unwrap()), objective(&alpha0), "the tape does not change the forward");
    let grads = tape.backward(&loss).unwrap();
    // The model is frozen: alpha is the only leaf that receives a gradient.
    assert_eq!(grads.len(), 1, "only alpha gets a gradient");
    let grad: Vec<f64> = grads.get(&alpha).unwrap().to_vec().unwrap().into_iter().map(f64::from).collect();

    // Directional derivatives: a per-element difference would have to resolve gradients of about
    // 1e-4 (a mean over 2 x 17 x 32 elements) against the objective's f32 rounding, so the
    // gradient is probed along whole directions instead, where the derivative is the sum of 544
    // terms (1e-2 to 1 here). Step 1e-2, applied in f64 and rounded to f32 once per element
    // (exact to 6e-8 relative of alpha): the central difference's truncation error is h^2/6 of
    // the third derivative, and the f32 objective (a value near 1 through two transformer
    // blocks, rounding noise of a few 1e-7) adds a few 1e-7 / 2e-2, about 1e-5 absolute.
    let h = 1e-2f64;
    let sign: Vec<f32> = grad.iter().map(|g| g.signum() as f32).collect();
    let directions =
        [sign, random_vec(3, t * w, -1.0, 1.0), random_vec(4, t * w, -1.0, 1.0), random_vec(5, t * w, 0.0, 1.0)];
    for (k, v) in directions.iter().enumerate() {
        let moved = |s: f64| -> Vec<f32> {
            alpha0.iter().zip(v).map(|(&a, &d)| (f64::from(a) + s * f64::from(d)) as f32).collect()
        };
        let numeric = (objective(&moved(h)) - objective(&moved(-h))) / (2.0 * h);
        let analytic: f64 = grad.iter().zip(v).map(|(&g, &d)| g * f64::from(d)).sum();
        // 1e-5 absolute for the rounding noise above, 0.5 % relative for the truncation (measured:
        // at most 3e-4 relative and 5e-5 absolute over these four directions).
        let tolerance = 1e-5 + 5e-3 * analytic.abs();
        assert!(
            (numeric - analytic).abs() <= tolerance,
            "direction {k}: analytic {analytic:.6e}, finite differences {numeric:.6e}"
        );
    }
}

#[test]
fn the_saliency_model_is_frozen() {
    // The demo checkpoint's config trains both towers; loaded for saliency, nothing trains.
    let model = SaliencyModel::load_on(common::repo_file("weights/demo"), &Device::Cpu).unwrap();
    assert!(model.model().trainable_parameters().next().is_none());
    // A model with trainable parameters is refused.
    let message = SaliencyModel::new(tiny_model(&Device::Cpu, false), tiny_tokenizer()).err().unwrap().to_string();
    assert!(message.contains("must be frozen"), "{message}");
}

#[test]
fn options_are_checked() {
    let depth = 4;
    assert!(SaliencyOptions::default().check(depth).is_ok());
    let bad = [
        SaliencyOptions { beta: -1.0, ..SaliencyOptions::default() },
        SaliencyOptions { beta: f32::NAN, ..SaliencyOptions::default() },
        SaliencyOptions { lr: 0.0, ..SaliencyOptions::default() },
        SaliencyOptions { copies: 0, ..SaliencyOptions::default() },
        SaliencyOptions { components: 0, ..SaliencyOptions::default() },
        SaliencyOptions { layer: Some(depth), ..SaliencyOptions::default() },
    ];
    for options in bad {
        assert!(options.check(depth).is_err(), "{options:?} passed");
    }
    assert_eq!(default_layer(12), 7);
    assert_eq!(default_layer(4), 2);
}

// ---------------------------------------------------------------------------------------------
// (b) k-means and connected components

/// A `w` x `h` map of `background` with the given rectangles `(x0, y0, x1, y1, value)`
/// (inclusive) painted in.
fn map_with(w: usize, h: usize, background: f32, rects: &[(usize, usize, usize, usize, f32)]) -> Vec<f32> {
    let mut map = vec![background; w * h];
    for &(x0, y0, x1, y1, value) in rects {
        for y in y0..=y1 {
            for x in x0..=x1 {
                map[y * w + x] = value;
            }
        }
    }
    map
}

#[test]
fn kmeans_splits_two_levels_and_components_keep_the_largest_blob() {
    let (w, h) = (12, 9);
    // Two blobs of high values (a 3x3 and a 2x2) on a low background with some spread.
    let mut map = map_with(w, h, 0.1, &[(1, 1, 3, 3, 0.9), (8, 5, 9, 6, 0.8)]);
    map[5 * w] = 0.2;
    map[8 * w + 11] = 0.0;
    let means = kmeans_two(&map).unwrap();
    let high: Vec<usize> = (0..w * h).filter(|&i| means.high_cluster[i]).collect();
    assert_eq!(high.len(), 9 + 4, "the two blobs and nothing else");
    assert!(high.iter().all(|&i| map[i] >= 0.8));
    // Centres are the means of their clusters.
    let hi_mean = (9.0 * 0.9 + 4.0 * 0.8) / 13.0;
    assert!((f64::from(means.high) - hi_mean).abs() < 1e-6, "{}", means.high);
    assert!(means.low < 0.15 && means.iterations >= 1);

    let one = largest_components(&means.high_cluster, w, h, 1).unwrap();
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].bbox, [1, 1, 3, 3]);
    assert_eq!(one[0].pixels.len(), 9);
    let both = largest_components(&means.high_cluster, w, h, 5).unwrap();
    assert_eq!(both.len(), 2, "only two components exist");
    assert_eq!(both[1].bbox, [8, 5, 9, 6]);
    let mask = component_mask(&one, w * h);
    assert_eq!(mask.iter().filter(|&&m| m).count(), 9);
}

#[test]
fn components_are_eight_connected_and_equal_sizes_keep_row_major_order() {
    let (w, h) = (6, 5);
    let mut mask = vec![false; w * h];
    // A diagonal of three pixels: one component under 8-connectivity.
    for (x, y) in [(0, 0), (1, 1), (2, 2)] {
        mask[y * w + x] = true;
    }
    // Two more 3-pixel components, lower in the image: ties broken by the first pixel.
    for (x, y) in [(5, 0), (5, 1), (5, 2), (0, 4), (1, 4), (2, 4)] {
        mask[y * w + x] = true;
    }
    let all = largest_components(&mask, w, h, 3).unwrap();
    let boxes: Vec<[usize; 4]> = all.iter().map(|c| c.bbox).collect();
    assert_eq!(boxes, [[0, 0, 2, 2], [5, 0, 5, 2], [0, 4, 2, 4]]);
    assert!(all.iter().all(|c| c.pixels.len() == 3));
    assert!(largest_components(&mask, 5, 5, 1).is_err(), "a mask of another size is refused");
}

#[test]
fn a_constant_map_marks_nothing() {
    let mut map = vec![0.37f32; 20];
    min_max_normalise(&mut map).unwrap();
    assert!(map.iter().all(|&v| v == 0.0), "a constant map normalises to zeros");
    let means = kmeans_two(&map).unwrap();
    assert!(means.high_cluster.iter().all(|&m| !m));
    assert!(largest_components(&means.high_cluster, 5, 4, 1).unwrap().is_empty());
    assert!(kmeans_two(&[]).unwrap().high_cluster.is_empty());
    assert!(kmeans_two(&[0.0, f32::NAN]).is_err());
    let mut bad = vec![0.0, f32::INFINITY];
    assert!(min_max_normalise(&mut bad).is_err());
}

#[test]
fn kmeans_assigns_a_value_equidistant_from_both_centres_to_the_low_cluster() {
    // Centres start at 0 and 1; 0.5 is a tie and goes low; then the centres are 1/6 and 1, the
    // midpoint 7/12 > 0.5, so it stays low.
    let means = kmeans_two(&[0.0, 0.0, 0.5, 1.0]).unwrap();
    assert_eq!(means.high_cluster, [false, false, false, true]);
}

// ---------------------------------------------------------------------------------------------
// (c) SAM prompts

#[test]
fn boxes_and_points_lie_inside_their_component() {
    let (w, h) = (10, 8);
    // An L-shaped blob with a saliency ramp and a tie, and a two-pixel blob.
    let mut map = map_with(w, h, 0.0, &[(1, 1, 5, 2, 0.7), (1, 3, 2, 6, 0.75), (8, 6, 9, 6, 0.9)]);
    map[2 * w + 4] = 1.0;
    map[5 * w + 1] = 0.95;
    map[6 * w + 2] = 0.95; // ties with (1, 5): row-major order puts (1, 5) first
    let means = kmeans_two(&map).unwrap();
    let kept = largest_components(&means.high_cluster, w, h, 2).unwrap();
    assert_eq!(kept.len(), 2);
    for component in &kept {
        let prompt = sam_prompt(component, &map, w).unwrap();
        let [x0, y0, x1, y1] = prompt.bbox;
        let inside: Vec<[usize; 2]> = component.pixels.iter().map(|&i| [i % w, i / w]).collect();
        assert_eq!(x0, inside.iter().map(|p| p[0]).min().unwrap());
        assert_eq!(y0, inside.iter().map(|p| p[1]).min().unwrap());
        assert_eq!(x1, inside.iter().map(|p| p[0]).max().unwrap());
        assert_eq!(y1, inside.iter().map(|p| p[1]).max().unwrap());
        assert_eq!(prompt.points.len(), component.pixels.len().min(10));
        for p in &prompt.points {
            assert!(inside.contains(p), "point {p:?} is outside its component");
        }
        // Most salient first.
        let values: Vec<f32> = prompt.points.iter().map(|p| map[p[1] * w + p[0]]).collect();
        assert!(values.windows(2).all(|v| v[0] >= v[1]), "{values:?}");
    }
    let big = sam_prompt(&kept[0], &map, w).unwrap();
    assert_eq!(big.bbox, [1, 1, 5, 6]);
    assert_eq!(&big.points[..3], &[[4, 2], [1, 5], [2, 6]]);
    let small = sam_prompt(&kept[1], &map, w).unwrap();
    assert_eq!(small.points, [[8, 6], [9, 6]], "a two-pixel component gives two points");
}

// ---------------------------------------------------------------------------------------------
// The whole map, and GPU against CPU

fn options() -> SaliencyOptions {
    // Two steps of two copies: the optimisation runs (and Adam moves alpha), cheaply enough for
    // the emulated GPU.
    SaliencyOptions { steps: 2, copies: 2, ..SaliencyOptions::default() }
}

#[test]
fn a_map_is_normalised_reproducible_and_at_the_image_size() {
    let model = SaliencyModel::new(tiny_model(&Device::Cpu, true), tiny_tokenizer()).unwrap();
    let image = picture(45, 27);
    let a = model.saliency(&image, "a bright round lesion", &options()).unwrap();
    assert_eq!((a.width, a.height, a.map.len(), a.mask.len()), (45, 27, 45 * 27, 45 * 27));
    assert_eq!((a.grid, a.patch_kl.len()), (4, 16));
    assert!(a.map.iter().all(|v| (0.0..=1.0).contains(v)));
    assert_eq!(a.map.iter().copied().fold(f32::MIN, f32::max), 1.0);
    assert_eq!(a.map.iter().copied().fold(f32::MAX, f32::min), 0.0);
    assert_eq!(a.objective.len(), 2);
    assert_eq!(a.prompts.len(), 1, "one component kept by default");
    assert!(a.mask.iter().any(|&m| m));
    let b = model.saliency(&image, "a bright round lesion", &options()).unwrap();
    assert_eq!(a, b, "the same seed gives the same result");
    let other = model.saliency(&image, "a bright round lesion", &SaliencyOptions { seed: 1, ..options() }).unwrap();
    assert_ne!(a.objective, other.objective, "another seed draws other noise");
    assert!(model.saliency(&image, "   ", &options()).is_err(), "an empty prompt is refused");
}

#[test]
fn gpu_saliency_matches_cpu() {
    let Some(gpu) = gpu() else { return };
    let image = picture(40, 24);
    let prompt = "a bright round lesion";
    let cpu = SaliencyModel::new(tiny_model(&Device::Cpu, true), tiny_tokenizer()).unwrap();
    let on_gpu = SaliencyModel::new(tiny_model(&gpu, true), tiny_tokenizer()).unwrap();
    let want = cpu.saliency(&image, prompt, &options()).unwrap();
    let got = on_gpu.saliency(&image, prompt, &options()).unwrap();
    // The objective goes through two FP32 transformer blocks with other summation orders: the
    // model parity budget of tests/clip_towers.rs (1e-4), on a value of about 1.
    assert_close("objective", &got.objective, &want.objective, 1e-4, 1e-4);
    // The per-patch KL is a sum of 32 channels of a few nats each (about 1e2); alpha follows
    // Adam's first steps, which move every element by about lr times the sign of its gradient,
    // so equal signs give equal alphas up to rounding: 1e-4 relative of the sum.
    assert_close("patch KL", &got.patch_kl, &want.patch_kl, 1e-3, 1e-4);
    // The normalised map divides by the KL's range (several nats): a few 1e-5 at most.
    assert_close("saliency", &got.map, &want.map, 1e-4, 0.0);
    assert_eq!(got.prompts.len(), want.prompts.len());
}
