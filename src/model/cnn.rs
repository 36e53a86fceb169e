//! VLSM-Ensemble's CNN branch (docs/cnn_branch.md): a UNet ("UNet-D") run beside MedCLIPSeg on the
//! same image, fed at its bottleneck with the vision tower's tokens modulated by the text
//! embedding (feature-level fusion), and whose logits are combined with MedCLIPSeg's by a learned
//! 1x1 convolution (output-level fusion).
//!
//! The branch runs channels-last (NHWC). Parameter names are the paper code's module names under
//! the `cnn.` prefix (`cnn.conv11.weight`, `cnn.bn1.running_mean`, `cnn.upconv41.weight`,
//! `cnn.eca4.conv.weight`, `cnn.outconv2.bias`, ...), so a UNet-D state dict converted by
//! `tools/convert_checkpoint.py cnn` loads as is.

use super::config::{unet_d, CnnBranchConfig, ModelConfig};
use super::layers::{Linear, Loader, Param};
use super::{Trace, TrainingPass};
use crate::error::{Error, Result};
use crate::ops;
use crate::tape::Tape;
use crate::tensor::Tensor;

/// Key prefix of every parameter of the branch.
pub const PREFIX: &str = "cnn";

/// Dropout streams of the branch live at layer numbers no tower uses (towers count from 0 up to
/// their depth), so its masks never reuse the text tower's words.
const DROPOUT_LAYER_BASE: u32 = 1 << 15;

/// A convolution's weight and bias under `cnn.<name>`.
struct Conv {
    weight: Param,
    bias: Param,
}

impl Conv {
    /// `nn.Conv2d(inp, out, k)`: weight `[out, inp, k, k]`.
    fn load(l: &mut Loader, name: &str, inp: usize, out: usize, k: usize) -> Result<Conv> {
        Ok(Conv {
            weight: l.param(&format!("{PREFIX}.{name}.weight"), &[out, inp, k, k])?,
            bias: l.param(&format!("{PREFIX}.{name}.bias"), &[out])?,
        })
    }

    /// `nn.ConvTranspose2d(inp, out, 2, stride=2)`: weight `[inp, out, 2, 2]`.
    fn load_transposed(l: &mut Loader, name: &str, inp: usize, out: usize) -> Result<Conv> {
        Ok(Conv {
            weight: l.param(&format!("{PREFIX}.{name}.weight"), &[inp, out, 2, 2])?,
            bias: l.param(&format!("{PREFIX}.{name}.bias"), &[out])?,
        })
    }

    fn forward(&self, tape: &Tape, x: &Tensor) -> Result<Tensor> {
        ops::conv2d_nhwc(tape, x, &self.weight.value, Some(&self.bias.value))
    }

    fn forward_transposed(&self, tape: &Tape, x: &Tensor) -> Result<Tensor> {
        ops::conv_transpose2x2_nhwc(tape, x, &self.weight.value, Some(&self.bias.value))
    }

    fn params_mut(&mut self) -> [&mut Param; 2] {
        [&mut self.weight, &mut self.bias]
    }
}

/// `nn.BatchNorm2d`: affine parameters (trained) and running statistics (buffers, never trained).
struct BatchNorm {
    weight: Param,
    bias: Param,
    running_mean: Param,
    running_var: Param,
}

impl BatchNorm {
    fn load(l: &mut Loader, name: &str, channels: usize) -> Result<BatchNorm> {
        let key = |field: &str| format!("{PREFIX}.{name}.{field}");
        Ok(BatchNorm {
            weight: l.param(&key("weight"), &[channels])?,
            bias: l.param(&key("bias"), &[channels])?,
            running_mean: l.buffer(&key("running_mean"), &[channels])?,
            running_var: l.buffer(&key("running_var"), &[channels])?,
        })
    }

    /// Batch statistics in training (their running averages are pushed to `updates`), the running
    /// statistics otherwise.
    fn forward(
        &self,
        tape: &Tape,
        x: &Tensor,
        cfg: &CnnBranchConfig,
        training: bool,
        updates: &mut Vec<(String, Tensor)>,
    ) -> Result<Tensor> {
        let (w, b) = (&self.weight.value, &self.bias.value);
        if !training {
            let (mean, var) = (&self.running_mean.value, &self.running_var.value);
            return ops::batch_norm_eval(tape, x, w, b, mean, var, cfg.bn_eps);
        }
        let (y, stats) = ops::batch_norm_train(tape, x, w, b, cfg.bn_eps)?;
        let (mean, var) =
            ops::batch_norm_running_update(&self.running_mean.value, &self.running_var.value, &stats, cfg.bn_momentum)?;
        updates.push((self.running_mean.key.clone(), mean));
        updates.push((self.running_var.key.clone(), var));
        Ok(y)
    }

    fn params_mut(&mut self) -> [&mut Param; 4] {
        [&mut self.weight, &mut self.bias, &mut self.running_mean, &mut self.running_var]
    }
}

/// Two 3x3 convolutions without an activation between them, then batch norm, ReLU, dropout
/// (training) and 2x2 max-pooling.
struct EncoderStage {
    first: Conv,
    second: Conv,
    norm: BatchNorm,
}

/// A 2x2 stride-2 transposed convolution, a 3x3 convolution (once, or twice with the same
/// weights), batch norm and ReLU.
struct DecoderStage {
    up: Conv,
    conv: Conv,
    norm: BatchNorm,
}

/// The paper code's module names per stage.
const ENCODER_NAMES: [[&str; 3]; 4] = [
    ["conv11", "conv12", "bn1"],
    ["conv22", "conv222", "bn2"],
    ["conv33", "conv333", "bn3"],
    ["conv44", "conv444", "bn4"],
];
const DECODER_NAMES: [[&str; 3]; 4] = [
    ["upconv4", "convup4", "upbn4"],
    ["upconv3", "convup3", "upbn3"],
    ["upconv2", "convup2", "upbn2"],
    ["upconv1", "convup1", "upbn1"],
];

pub struct CnnBranch {
    config: CnnBranchConfig,
    /// The vision block (1-based) whose output tokens feed the fusion.
    vision_layer: usize,
    grid: usize,
    encoder: Vec<EncoderStage>,
    /// The 1x1 convolution over [vision features, deepest encoder stage] (`upconv41`).
    bottleneck: Conv,
    /// ECA's 1-D kernel `[1, 1, k]` (`eca4.conv.weight`).
    eca: Param,
    decoder: Vec<DecoderStage>,
    /// 1x1 convolution to one logit channel (`outconv`).
    head: Conv,
    /// Patch tokens -> fusion channels (`reduce`), and the text embedding -> FiLM scale and shift.
    reduce: Linear,
    film_mul: Linear,
    film_add: Linear,
    /// The learned 1x1 convolution over [MedCLIPSeg logits, CNN logits] (`outconv2`).
    fuse: Conv,
}

/// What the branch adds to a forward pass.
pub struct CnnOutput {
    /// `[B, H, W]` logits of the branch alone.
    pub logits: Tensor,
    /// Running statistics after this pass, by key (training only; empty otherwise).
    pub running_statistics: Vec<(String, Tensor)>,
}

impl CnnBranch {
    pub fn load(l: &mut Loader, c: &ModelConfig, cfg: &CnnBranchConfig) -> Result<CnnBranch> {
        let ch = |base: usize| cfg.channels(base);
        let mut encoder = Vec::new();
        let mut inp = 3;
        for (names, base) in ENCODER_NAMES.iter().zip(unet_d::ENCODER) {
            let out = ch(base);
            encoder.push(EncoderStage {
                first: Conv::load(l, names[0], inp, out, 3)?,
                second: Conv::load(l, names[1], out, out, 3)?,
                norm: BatchNorm::load(l, names[2], out)?,
            });
            inp = out;
        }
        let fusion = ch(unet_d::FUSION);
        let bottleneck_channels = ch(unet_d::BOTTLENECK);
        let bottleneck = Conv::load(l, "upconv41", fusion + inp, bottleneck_channels, 1)?;
        let eca_kernel = CnnBranchConfig::eca_kernel(bottleneck_channels);
        let eca = l.param(&format!("{PREFIX}.eca4.conv.weight"), &[1, 1, eca_kernel])?;
        let mut decoder = Vec::new();
        let mut inp = bottleneck_channels;
        for (k, (names, base)) in DECODER_NAMES.iter().zip(unet_d::DECODER).enumerate() {
            let out = ch(base);
            decoder.push(DecoderStage {
                up: Conv::load_transposed(l, names[0], inp, out)?,
                conv: Conv::load(l, names[1], out, out, 3)?,
                norm: BatchNorm::load(l, names[2], out)?,
            });
            // Every stage but the last is concatenated with the encoder stage of its size.
            inp = out + if k < 3 { ch(unet_d::ENCODER[2 - k]) } else { 0 };
        }
        Ok(CnnBranch {
            config: cfg.clone(),
            vision_layer: cfg.resolved_vision_layer(c.vision_layers),
            grid: c.grid(),
            encoder,
            bottleneck,
            eca,
            decoder,
            head: Conv::load(l, "outconv", inp, 1, 1)?,
            reduce: Linear::load(l, &format!("{PREFIX}.reduce"), fusion, c.vision_width, true)?,
            film_mul: Linear::load(l, &format!("{PREFIX}.film_mul"), fusion, c.embed_dim, true)?,
            film_add: Linear::load(l, &format!("{PREFIX}.film_add"), fusion, c.embed_dim, true)?,
            fuse: Conv::load(l, "outconv2", 2, 1, 1)?,
        })
    }

    /// The vision block (1-based) whose output tokens [`CnnBranch::forward`] takes.
    pub fn vision_layer(&self) -> usize {
        self.vision_layer
    }

    /// The branch's logits for `pixels` `[B, 3, H, W]`, with `tokens` `[B, 1 + g*g, Wv]` (the
    /// chosen vision block's output) and `text` `[B, E]` (the text embedding) fused at the
    /// bottleneck. `training` switches batch norm to batch statistics and on the dropout.
    pub fn forward(
        &self,
        tape: &Tape,
        pixels: &Tensor,
        tokens: &Tensor,
        text: &Tensor,
        training: Option<&TrainingPass>,
        trace: &mut Trace,
    ) -> Result<CnnOutput> {
        let cfg = &self.config;
        let (b, h, w) = (pixels.dim(0), pixels.dim(2), pixels.dim(3));
        let mut updates = Vec::new();
        let mut x = ops::permute(tape, pixels, &[0, 2, 3, 1])?;
        let mut skips = Vec::with_capacity(self.encoder.len());
        for (k, stage) in self.encoder.iter().enumerate() {
            let y = stage.first.forward(tape, &x)?;
            let y = stage.second.forward(tape, &{ y })?;
            let y = stage.norm.forward(tape, &{ y }, cfg, training.is_some(), &mut updates)?;
            let y = ops::relu(tape, &{ y })?;
            let y = match training {
                Some(t) if cfg.dropout > 0.0 => {
                    let stream = ops::dropout_stream_id(t.step, DROPOUT_LAYER_BASE + k as u32, 0);
                    ops::dropout(tape, &{ y }, cfg.dropout, ops::DropoutKey { seed: t.seed, stream })?
                }
                _ => y,
            };
            x = ops::max_pool2x2_nhwc(tape, &{ y })?;
            trace.put(|| format!("act.cnn.encoder.{k}"), &x);
            skips.push(x.clone());
        }

        let features = self.vision_features(tape, tokens, text, x.dim(1), x.dim(2))?;
        trace.put(|| "act.cnn.features".into(), &features);
        let x = ops::concat(tape, &[&features, &x], 3)?;
        let x = self.bottleneck.forward(tape, &x)?;
        let mut x = ops::eca_nhwc(tape, &{ x }, &self.eca.value)?;
        trace.put(|| "act.cnn.bottleneck".into(), &x);
        for (k, stage) in self.decoder.iter().enumerate() {
            let y = stage.up.forward_transposed(tape, &x)?;
            let mut y = stage.conv.forward(tape, &{ y })?;
            if cfg.repeat_decoder_conv {
                y = stage.conv.forward(tape, &{ y })?;
            }
            let y = stage.norm.forward(tape, &{ y }, cfg, training.is_some(), &mut updates)?;
            let y = ops::relu(tape, &{ y })?;
            x = match skips.len().checked_sub(k + 2) {
                Some(skip) => ops::concat(tape, &[&y, &skips[skip]], 3)?,
                None => y,
            };
            trace.put(|| format!("act.cnn.decoder.{k}"), &x);
        }
        let logits = self.head.forward(tape, &x)?;
        let logits = ops::reshape(tape, &logits, &[b, h, w])?;
        trace.put(|| "act.cnn.logits".into(), &logits);
        Ok(CnnOutput { logits, running_statistics: updates })
    }

    /// Patch tokens -> `reduce` -> FiLM by the text embedding -> laid out on the patch grid ->
    /// resized (bilinear) to the bottleneck's `rows x cols`: `[B, rows, cols, fusion]`.
    fn vision_features(&self, tape: &Tape, tokens: &Tensor, text: &Tensor, rows: usize, cols: usize) -> Result<Tensor> {
        let (b, g) = (tokens.dim(0), self.grid);
        if tokens.rank() != 3 || tokens.dim(1) != g * g + 1 || text.rank() != 2 || text.dim(0) != b {
            return Err(Error::shape(
                "cnn branch",
                format!("tokens {:?} and text {:?} do not fit a {g}x{g} patch grid", tokens.shape(), text.shape()),
            ));
        }
        let patches = ops::narrow(tape, tokens, 1, 1, g * g)?;
        let reduced = self.reduce.forward(tape, &patches)?; // [B, g*g, R]
        let r = reduced.dim(2);
        let scale = ops::reshape(tape, &self.film_mul.forward(tape, text)?, &[b, 1, r])?;
        let shift = ops::reshape(tape, &self.film_add.forward(tape, text)?, &[b, 1, r])?;
        let modulated = ops::add(tape, &ops::mul(tape, &reduced, &scale)?, &shift)?;
        if (rows, cols) == (g, g) {
            return ops::reshape(tape, &modulated, &[b, g, g, r]);
        }
        let nchw = ops::reshape(tape, &ops::permute(tape, &modulated, &[0, 2, 1])?, &[b, r, g, g])?;
        let resized = ops::resize_bilinear_nchw(tape, &nchw, rows, cols)?;
        ops::permute(tape, &resized, &[0, 2, 3, 1])
    }

    /// The fused logits `[N, H, W]`: the learned 1x1 convolution over the channels
    /// [MedCLIPSeg logits, CNN logits], in that order (the paper code's `outconv2`).
    pub fn fuse(&self, tape: &Tape, vlm_logits: &Tensor, cnn_logits: &Tensor) -> Result<Tensor> {
        let shape = vlm_logits.shape().to_vec();
        let mut column = shape.clone();
        column.push(1);
        let vlm = ops::reshape(tape, vlm_logits, &column)?;
        let cnn = ops::reshape(tape, cnn_logits, &column)?;
        let stacked = ops::concat(tape, &[&vlm, &cnn], column.len() - 1)?;
        let fused = self.fuse.forward(tape, &stacked)?;
        ops::reshape(tape, &fused, &shape)
    }

    pub fn params_mut(&mut self) -> Vec<&mut Param> {
        let mut all: Vec<&mut Param> = Vec::new();
        for stage in &mut self.encoder {
            all.extend(stage.first.params_mut());
            all.extend(stage.second.params_mut());
            all.extend(stage.norm.params_mut());
        }
        all.extend(self.bottleneck.params_mut());
        all.push(&mut self.eca);
        for stage in &mut self.decoder {
            all.extend(stage.up.params_mut());
            all.extend(stage.conv.params_mut());
            all.extend(stage.norm.params_mut());
        }
        all.extend(self.head.params_mut());
        all.extend(self.reduce.params_mut());
        all.extend(self.film_mul.params_mut());
        all.extend(self.film_add.params_mut());
        all.extend(self.fuse.params_mut());
        all
    }
}
