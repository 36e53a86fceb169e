//! `bench saliency`: the M2IB bottleneck of one image (`saliency::optimise_bottleneck`: `--steps`
//! of the bottleneck are not the timed steps; one timed step is the whole optimisation, 10 Adam
//! steps of 10 noise copies by default, each a forward and backward pass through the vision tower
//! from the bottleneck's layer on), with random weights and the model frozen. Left out: decoding
//! the image, the saliency map's resize and the post-processing (k-means, components, prompts),
//! which cost little beside it.

use mcs_engine::data;
use mcs_engine::model::weights::WeightStore;
use mcs_engine::model::MedClipSeg;
use mcs_engine::saliency::{optimise_bottleneck, SaliencyOptions};
use mcs_engine::{Result, Tensor};

use super::predict::test_image;
use super::{prompt_ids, Report, Setup, Timing};

pub fn run(setup: &Setup) -> Result<Report> {
    let (config, device, args) = (&setup.config, &setup.device, setup.args);
    let size = config.image_size;
    let mut frozen = config.clone();
    frozen.trainable.clear();
    let model = MedClipSeg::from_store(frozen, WeightStore::synthetic(1), device)?;
    let ids = prompt_ids(config, 1, None)?;
    let pixels = data::normalise_bgr(&test_image(size, 0)?)?;
    let input = Tensor::from_slice(&pixels, &[1, 3, size, size], device)?;
    let options = SaliencyOptions::default();
    options.check(config.vision_layers)?;
    let timing = Timing::measure(device, args.warmup, args.steps, |_| {
        std::hint::black_box(optimise_bottleneck(&model, &input, &ids, &options)?);
        Ok(())
    })?;
    let mut fields = serde_json::Map::new();
    fields.insert("layer".into(), options.layer_for(config.vision_layers).into());
    fields.insert("bottleneck_steps".into(), options.steps.into());
    fields.insert("copies".into(), options.copies.into());
    timing.insert(&mut fields, "");
    let text = format!(
        "saliency (M2IB), one image at {size} px, bottleneck after block {} of {}, {} Adam steps x {} noise copies: {}",
        options.layer_for(config.vision_layers),
        config.vision_layers,
        options.steps,
        options.copies,
        timing.text()
    );
    Ok(Report { fields, text, timings: vec![("saliency".into(), timing)] })
}
