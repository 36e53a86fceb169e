//! `bench attention`: the fused probabilistic attention (`ops::prob_attention`, docs/model.md §2.3) alone,
//! at the shapes the config's PVL adapters give it, with `--samples` draws stacked in the batch:
//! image->text (queries the `1 + grid²` image tokens, keys and values the text context) and
//! text->image (the reverse). Inputs are random with the model's ranges (variances through
//! `softplus + 1e-6`, as the adapters make them). Per direction it times the forward on an
//! inference tape, and forward + backward through a recording tape to the gradients of all five
//! inputs (in training every one of them comes from a trainable projection). The V noise is drawn
//! inside the op, so both timings include it, as PyTorch's `torch.randn` is in the reference's.

use mcs_engine::ops::{self, ItemNoise, NoiseKey, NoiseMode};
use mcs_engine::philox::fill_normal;
use mcs_engine::{Device, Result, Tape, Tensor};

use super::{Report, Setup, Timing};

pub fn run(setup: &Setup) -> Result<Report> {
    let (config, device) = (&setup.config, &setup.device);
    let (batch, samples) = (setup.batch(1), setup.samples());
    let rows = samples * batch;
    let (image_tokens, text_tokens, c) = (config.vision_tokens(), config.text_context_length, config.adapter_dim);
    let mut fields = serde_json::Map::new();
    fields.insert("batch".into(), batch.into());
    fields.insert("samples".into(), samples.into());
    let mut directions = Vec::new();
    let mut timings = Vec::new();
    let mut text = Vec::new();
    // Direction ids as in the adapter: 0 image->text, 1 text->image.
    for (direction, name, tq, tk) in
        [(0u32, "image_to_text", image_tokens, text_tokens), (1, "text_to_image", text_tokens, image_tokens)]
    {
        let inputs = Inputs::random(rows, tq, tk, c, direction, device)?;
        let noise = NoiseKey {
            seed: 666,
            first_draw: 0,
            samples,
            adapter: 0,
            direction,
            mode: NoiseMode::Plain,
            items: ItemNoise::ByRow,
        };
        let forward = time(setup, |_| {
            let tape = Tape::inference();
            std::hint::black_box(inputs.attend(&tape, config.beta, noise)?);
            Ok(())
        })?;
        let trainable = inputs.trainable();
        let backward = time(setup, |_| {
            let tape = Tape::new();
            let out = trainable.attend(&tape, config.beta, noise)?;
            let grads = tape.backward_from(&out, trainable.d_out.clone())?;
            std::hint::black_box(grads);
            Ok(())
        })?;
        let mut entry = serde_json::Map::new();
        entry.insert("direction".into(), name.into());
        entry.insert("q_shape".into(), serde_json::json!([rows, tq, c]));
        entry.insert("kv_shape".into(), serde_json::json!([rows, tk, c]));
        forward.insert(&mut entry, "forward_");
        backward.insert(&mut entry, "forward_backward_");
        directions.push(serde_json::Value::Object(entry));
        timings.push((format!("{name} forward"), forward.clone()));
        timings.push((format!("{name} forward+backward"), backward.clone()));
        text.push(format!(
            "{name}, q [{rows}, {tq}, {c}], k/v [{rows}, {tk}, {c}]: forward {}; forward+backward {}",
            forward.text(),
            backward.text()
        ));
    }
    fields.insert("directions".into(), directions.into());
    Ok(Report { fields, text: text.join("\n"), timings })
}

fn time(setup: &Setup, step: impl FnMut(usize) -> Result<()>) -> Result<Timing> {
    Timing::measure(&setup.device, setup.args.warmup, setup.args.steps, step)
}

/// The five attention inputs and an output gradient, on the device.
struct Inputs {
    q: Tensor,
    k_mu: Tensor,
    k_var: Tensor,
    v_mu: Tensor,
    v_var: Tensor,
    d_out: Tensor,
}

impl Inputs {
    /// Standard normal means and queries, `softplus(normal) + 1e-6` variances; each tensor from
    /// its own Philox stream (seed 1; streams far from the attention's own noise streams).
    fn random(rows: usize, tq: usize, tk: usize, c: usize, direction: u32, device: &Device) -> Result<Inputs> {
        let make = |stream: u64, shape: &[usize], positive: bool| -> Result<Tensor> {
            let mut values = vec![0.0f32; shape.iter().product()];
            fill_normal(1, (1 << 40) + 8 * u64::from(direction) + stream, &mut values);
            if positive {
                values.iter_mut().for_each(|v| *v = v.exp().ln_1p() + 1e-6);
            }
            Tensor::from_slice(&values, shape, device)
        };
        let (queries, keys) = ([rows, tq, c], [rows, tk, c]);
        Ok(Inputs {
            q: make(0, &queries, false)?,
            k_mu: make(1, &keys, false)?,
            k_var: make(2, &keys, true)?,
            v_mu: make(3, &keys, false)?,
            v_var: make(4, &keys, true)?,
            d_out: make(5, &queries, false)?,
        })
    }

    /// The same tensors marked as leaves the tape differentiates.
    fn trainable(&self) -> Inputs {
        Inputs {
            q: self.q.clone().into_trainable(),
            k_mu: self.k_mu.clone().into_trainable(),
            k_var: self.k_var.clone().into_trainable(),
            v_mu: self.v_mu.clone().into_trainable(),
            v_var: self.v_var.clone().into_trainable(),
            d_out: self.d_out.clone(),
        }
    }

    fn attend(&self, tape: &Tape, beta: f32, noise: NoiseKey) -> Result<Tensor> {
        ops::prob_attention(tape, &self.q, &self.k_mu, &self.k_var, &self.v_mu, &self.v_var, beta, noise)
    }
}
