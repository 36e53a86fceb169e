"""VLSM-Ensemble's CNN branch and its fusion with MedCLIPSeg, in plain PyTorch, written from the
engine's description (docs/cnn_branch.md), not from the paper's code.

  * UNet-D: four encoder stages of two 3x3 convolutions (no activation between them), batch norm,
    ReLU, dropout, 2x2 max-pooling (the pooled output is the stage's skip); a 1x1 bottleneck over
    [vision features, deepest stage] gated by ECA; four decoder stages of a 2x2 stride-2 transposed
    convolution, a 3x3 convolution (applied twice with the same weights when `repeat_decoder_conv`),
    batch norm and ReLU, each but the last concatenated with the encoder stage of its size; a 1x1
    output convolution;
  * feature fusion: the chosen vision block's patch tokens -> Linear(reduce) -> FiLM by the text
    embedding (film_mul * a + film_add) -> patch grid -> bilinear resize to the bottleneck's size;
  * output fusion: Conv2d(2, 1, 1) over [MedCLIPSeg logits, CNN logits] (`outconv2`);
  * Monte-Carlo inference: the chosen block's tokens and the text embedding are averaged over the
    draws, the branch runs once per image, and its logits are fused with every draw's logits.

Parameter names are the paper code's module names under `cnn.` (`cnn.conv11.weight`, ...).
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import MedCLIPSeg, TRAINABLE_PARTS

ENCODER = (64, 128, 256, 512)
BOTTLENECK = 1240
DECODER = (546, 182, 91, 45)
FUSION = 128
ENCODER_NAMES = (("conv11", "conv12", "bn1"), ("conv22", "conv222", "bn2"), ("conv33", "conv333", "bn3"),
                 ("conv44", "conv444", "bn4"))
DECODER_NAMES = (("upconv4", "convup4", "upbn4"), ("upconv3", "convup3", "upbn3"), ("upconv2", "convup2", "upbn2"),
                 ("upconv1", "convup1", "upbn1"))


def scaled(base, width):
    return max(1, int(math.floor(base * width + 0.5)))


def eca_kernel(channels):
    t = int(math.floor((math.log2(channels) + 1) / 2))
    return t if t % 2 else t + 1


def resolved_vision_layer(branch, layers):
    return branch.get("vision_layer", 0) or max(1, -(-3 * layers // 4))


class Eca(nn.Module):
    def __init__(self, channels):
        super().__init__()
        k = eca_kernel(channels)
        self.conv = nn.Conv1d(1, 1, k, padding=(k - 1) // 2, bias=False)

    def forward(self, x):  # [B, C, H, W]
        pooled = x.mean(dim=(2, 3))  # [B, C]
        gate = torch.sigmoid(self.conv(pooled.unsqueeze(1)).squeeze(1))
        return x * gate[:, :, None, None]


class UNetD(nn.Module):
    def __init__(self, cfg, branch):
        super().__init__()
        w = branch.get("width", 1.0)
        self.repeat = branch.get("repeat_decoder_conv", False)
        self.dropout = branch.get("dropout", 0.1)
        momentum, eps = branch.get("bn_momentum", 0.1), branch.get("bn_eps", 1e-5)
        c = lambda n: scaled(n, w)  # noqa: E731
        inp = 3
        for (a, b, bn), base in zip(ENCODER_NAMES, ENCODER):
            setattr(self, a, nn.Conv2d(inp, c(base), 3, padding=1))
            setattr(self, b, nn.Conv2d(c(base), c(base), 3, padding=1))
            setattr(self, bn, nn.BatchNorm2d(c(base), eps=eps, momentum=momentum))
            inp = c(base)
        self.upconv41 = nn.Conv2d(c(FUSION) + inp, c(BOTTLENECK), 1)
        self.eca4 = Eca(c(BOTTLENECK))
        inp = c(BOTTLENECK)
        for k, ((up, conv, bn), base) in enumerate(zip(DECODER_NAMES, DECODER)):
            setattr(self, up, nn.ConvTranspose2d(inp, c(base), 2, stride=2))
            setattr(self, conv, nn.Conv2d(c(base), c(base), 3, padding=1))
            setattr(self, bn, nn.BatchNorm2d(c(base), eps=eps, momentum=momentum))
            inp = c(base) + (c(ENCODER[2 - k]) if k < 3 else 0)
        self.outconv = nn.Conv2d(inp, 1, 1)
        self.outconv2 = nn.Conv2d(2, 1, 1)
        self.reduce = nn.Linear(cfg.vision_width, c(FUSION))
        self.film_mul = nn.Linear(cfg.embed_dim, c(FUSION))
        self.film_add = nn.Linear(cfg.embed_dim, c(FUSION))
        self.grid = cfg.grid

    def features(self, tokens, text, size):
        """Patch tokens [B, 1 + g*g, Wv] and text [B, E] -> [B, R, size, size]."""
        a = self.reduce(tokens[:, 1:, :])
        a = self.film_mul(text)[:, None, :] * a + self.film_add(text)[:, None, :]
        b, g = a.shape[0], self.grid
        a = a.permute(0, 2, 1).reshape(b, -1, g, g)
        if size != g:
            a = F.interpolate(a, size=(size, size), mode="bilinear", align_corners=False)
        return a

    def forward(self, pixels, tokens, text, acts):
        x = pixels
        skips = []
        for k, (a, b, bn) in enumerate(ENCODER_NAMES):
            y = getattr(self, bn)(getattr(self, b)(getattr(self, a)(x)))
            y = F.dropout(F.relu(y), self.dropout, self.training)
            x = F.max_pool2d(y, 2)
            acts[f"act.cnn.encoder.{k}"] = x.permute(0, 2, 3, 1)
            skips.append(x)
        feats = self.features(tokens, text, x.shape[2])
        acts["act.cnn.features"] = feats.permute(0, 2, 3, 1)
        x = self.eca4(self.upconv41(torch.cat([feats, x], dim=1)))
        acts["act.cnn.bottleneck"] = x.permute(0, 2, 3, 1)
        for k, (up, conv, bn) in enumerate(DECODER_NAMES):
            y = getattr(self, conv)(getattr(self, up)(x))
            if self.repeat:
                y = getattr(self, conv)(y)
            y = F.relu(getattr(self, bn)(y))
            x = torch.cat([y, skips[2 - k]], dim=1) if k < 3 else y
            acts[f"act.cnn.decoder.{k}"] = x.permute(0, 2, 3, 1)
        logits = self.outconv(x).squeeze(1)
        acts["act.cnn.logits"] = logits
        return logits

    def fuse(self, vlm_logits, cnn_logits):
        return self.outconv2(torch.stack([vlm_logits, cnn_logits], dim=1)).squeeze(1)


class MedCLIPSegWithCnn(MedCLIPSeg):
    """MedCLIPSeg with the CNN branch under `cnn.`."""

    def __init__(self, cfg, branch):
        super().__init__(cfg)
        self.cnn = UNetD(cfg, branch)
        self.vision_layer = resolved_vision_layer(branch, cfg.vision_layers)
        for name, p in self.named_parameters():
            p.requires_grad_(is_trainable(name))

    def forward(self, pixels, ids, seed, draw):
        acts = {}
        tokens, text_embedding = self.encode(pixels, ids, seed, draw, acts)
        vlm = self.segment(tokens, text_embedding, acts)
        layer_tokens = acts[f"act.vision.block.{self.vision_layer - 1}"]
        cnn = self.cnn(pixels, layer_tokens, text_embedding, acts)
        fused = self.cnn.fuse(vlm, cnn)
        acts["act.cnn.fused"] = fused
        return fused, acts

    def predict(self, pixels, ids, seed, num_samples):
        """Fused Monte-Carlo logits [N, B, H, W], mean probability, entropy (nats)."""
        draws = []
        for n in range(num_samples):
            acts = {}
            tokens, text = self.encode(pixels, ids, seed, n, acts)
            draws.append((self.segment(tokens, text), acts[f"act.vision.block.{self.vision_layer - 1}"], text))
        tokens = torch.stack([d[1] for d in draws]).mean(dim=0)
        text = torch.stack([d[2] for d in draws]).mean(dim=0)
        cnn = self.cnn(pixels, tokens, text, {})
        samples = torch.stack([self.cnn.fuse(d[0], cnn) for d in draws])
        p = torch.sigmoid(samples).mean(dim=0)
        entropy = -(p * torch.log(p + 1e-8) + (1 - p) * torch.log(1 - p + 1e-8))
        return samples, p, entropy


def is_trainable(name):
    return name.startswith("cnn.") or any(part in name for part in TRAINABLE_PARTS)
