//! The probabilistic vision-language (PVL) adapter (docs/model.md §2): down-projections of both towers'
//! hidden states, image->text then text->image probabilistic cross-attention, up-projections.

use super::config::ModelConfig;
use super::layers::{Linear, Loader, Norm, Param};
use crate::error::{Error, Result};
use crate::ops::{self, ItemNoise, NoiseKey, NoiseMode};
use crate::tape::Tape;
use crate::tensor::Tensor;

/// Which Monte-Carlo draws a forward pass makes: the batch is stacked `samples` times and copy `s`
/// draws its noise as draw `first_draw + s` (docs/model.md §5; the training step number during training),
/// related to the other draws as `mode` says (training: always plain), the batch's items each
/// drawing their own noise or all the same as `items` says (training: by row; inference: shared).
#[derive(Clone, Copy, Debug)]
pub struct Sampling {
    pub seed: u64,
    pub first_draw: u64,
    pub samples: usize,
    pub mode: NoiseMode,
    pub items: ItemNoise,
}

/// The one check of a Monte-Carlo sample count (a forward pass, `segment::Options`): at least 1.
pub fn check_samples(samples: usize) -> Result<()> {
    if samples == 0 {
        return Err(Error::Invalid("the number of Monte-Carlo samples must be at least 1".into()));
    }
    Ok(())
}

impl Sampling {
    /// Inference's sampling: draws `0..samples` of `seed`, every batch item reading the same noise
    /// (an image's maps do not depend on the batch it is in).
    pub fn inference(seed: u64, samples: usize, mode: NoiseMode) -> Sampling {
        Sampling { seed, first_draw: 0, samples, mode, items: ItemNoise::Shared }
    }
}

/// Image queries attend to text (direction 0), then text queries attend to the updated image
/// tokens (direction 1); the direction is part of the noise stream id.
const IMAGE_TO_TEXT: u32 = 0;
const TEXT_TO_IMAGE: u32 = 1;

pub struct PvlAdapter {
    index: u32,
    vis_down: Linear,
    txt_down: Linear,
    vis_up: Linear,
    txt_up: Linear,
    img_to_txt: ProbCrossAttention,
    txt_to_img: ProbCrossAttention,
}

/// Single-head cross-attention whose keys carry a variance and whose values are sampled
/// (docs/model.md §2.3), gated against the query tokens by `sigmoid(gate)`.
pub struct ProbCrossAttention {
    dim: usize,
    beta: f32,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    norm_k: Norm,
    norm_v: Norm,
    gate: Param,
}

/// What the adapter's intermediate results are, for parity traces.
pub struct AdapterOutput {
    pub dv: Tensor,
    pub dt: Tensor,
    pub v_prime: Tensor,
    pub t_prime: Tensor,
}

impl PvlAdapter {
    pub fn load(l: &mut Loader, c: &ModelConfig, index: usize) -> Result<PvlAdapter> {
        let p = format!("pvl_adapters.{index}");
        let a = c.adapter_dim;
        Ok(PvlAdapter {
            index: index as u32,
            vis_down: Linear::load(l, &format!("{p}.proj_vis_down.0"), a, c.vision_width, false)?,
            txt_down: Linear::load(l, &format!("{p}.proj_txt_down"), a, c.text_width, false)?,
            vis_up: Linear::load(l, &format!("{p}.proj_vis_up"), c.vision_width, a, false)?,
            txt_up: Linear::load(l, &format!("{p}.proj_txt_up"), c.text_width, a, false)?,
            img_to_txt: ProbCrossAttention::load(l, c, &format!("{p}.two_way.cross_attn_img_to_txt"))?,
            txt_to_img: ProbCrossAttention::load(l, c, &format!("{p}.two_way.cross_attn_txt_to_img"))?,
        })
    }

    /// `(dV, dT)` for image hidden states `[S*B, Tv, Wv]` and text ones `[S*B, L, Wt]`.
    pub fn forward(&self, tape: &Tape, image: &Tensor, text: &Tensor, sampling: Sampling) -> Result<AdapterOutput> {
        let noise = |direction| NoiseKey {
            seed: sampling.seed,
            first_draw: sampling.first_draw,
            samples: sampling.samples,
            adapter: self.index,
            direction,
            mode: sampling.mode,
            items: sampling.items,
        };
        let v = self.vis_down.forward(tape, image)?;
        let t = self.txt_down.forward(tape, text)?;
        let v_prime = self.img_to_txt.forward(tape, &v, &t, noise(IMAGE_TO_TEXT))?;
        let t_prime = self.txt_to_img.forward(tape, &t, &v_prime, noise(TEXT_TO_IMAGE))?;
        Ok(AdapterOutput {
            dv: self.vis_up.forward(tape, &v_prime)?,
            dt: self.txt_up.forward(tape, &t_prime)?,
            v_prime,
            t_prime,
        })
    }

    pub fn params_mut(&mut self) -> Vec<&mut Param> {
        let mut all = Vec::new();
        for linear in [&mut self.vis_down, &mut self.txt_down, &mut self.vis_up, &mut self.txt_up] {
            all.extend(linear.params_mut());
        }
        all.extend(self.img_to_txt.params_mut());
        all.extend(self.txt_to_img.params_mut());
        all
    }
}

impl ProbCrossAttention {
    fn load(l: &mut Loader, c: &ModelConfig, p: &str) -> Result<ProbCrossAttention> {
        let d = c.adapter_dim;
        Ok(ProbCrossAttention {
            dim: d,
            beta: c.beta,
            q_proj: Linear::load(l, &format!("{p}.q_proj"), d, d, true)?,
            k_proj: Linear::load(l, &format!("{p}.k_proj"), 2 * d, d, true)?,
            v_proj: Linear::load(l, &format!("{p}.v_proj"), 2 * d, d, true)?,
            out_proj: Linear::load(l, &format!("{p}.out_proj"), d, d, true)?,
            norm_k: Norm::load(l, &format!("{p}.norm_k"), d, c.adapter_ln_eps)?,
            norm_v: Norm::load(l, &format!("{p}.norm_v"), d, c.adapter_ln_eps)?,
            gate: l.param(&format!("{p}.gate"), &[])?,
        })
    }

    /// Mean through LayerNorm, variance through `softplus + 1e-6`, from one `[.., 2C]` projection.
    fn mean_and_variance(&self, tape: &Tape, projected: &Tensor, norm: &Norm) -> Result<(Tensor, Tensor)> {
        let mean = ops::narrow(tape, projected, 2, 0, self.dim)?;
        let spread = ops::narrow(tape, projected, 2, self.dim, self.dim)?;
        let mean = norm.forward(tape, &mean)?;
        let variance = ops::add_scalar(tape, &ops::softplus(tape, &spread)?, 1e-6)?;
        Ok((mean, variance))
    }

    /// `Y = g * out_proj(A V_sample) + (1 - g) * X` for queries `x` and context `z`.
    pub fn forward(&self, tape: &Tape, x: &Tensor, z: &Tensor, noise: NoiseKey) -> Result<Tensor> {
        let q = self.q_proj.forward(tape, x)?;
        let (k_mu, k_var) = self.mean_and_variance(tape, &self.k_proj.forward(tape, z)?, &self.norm_k)?;
        let (v_mu, v_var) = self.mean_and_variance(tape, &self.v_proj.forward(tape, z)?, &self.norm_v)?;
        let o = ops::prob_attention(tape, &q, &k_mu, &k_var, &v_mu, &v_var, self.beta, noise)?;
        let o = self.out_proj.forward(tape, &o)?;
        let g = ops::sigmoid(tape, &self.gate.value)?;
        let keep = ops::add_scalar(tape, &ops::neg(tape, &g)?, 1.0)?;
        ops::add(tape, &ops::mul(tape, &g, &o)?, &ops::mul(tape, &keep, x)?)
    }

    fn params_mut(&mut self) -> Vec<&mut Param> {
        let mut all = Vec::new();
        for linear in [&mut self.q_proj, &mut self.k_proj, &mut self.v_proj, &mut self.out_proj] {
            all.extend(linear.params_mut());
        }
        all.extend(self.norm_k.params_mut());
        all.extend(self.norm_v.params_mut());
        all.push(&mut self.gate);
        all
    }
}
