"""MedCLIPSeg in plain PyTorch, written from the official code as docs/model.md describes it (sections 1-5, 9-10).

This is the reference the Rust engine is checked against (through committed fixtures). It follows the
official code's maths, quirks included:
  * ViT (open_clip VisualTransformer, QuickGELU, pre-LN) with ln_post + proj applied to ALL tokens;
  * BERT (HF BertModel semantics, post-LN, exact-erf GELU, additive pad mask on keys, no pooler);
  * text embedding = text MLP projection of the last layer's [CLS] state (not normalised);
  * ViT blocks and BERT layers run in lock-step; PVL adapter k runs before block adapter_layers[k]
    and adds its outputs to both hidden states (docs/model.md §2.1);
  * ProbCrossAttention (docs/model.md §2.3) with the V sample drawn from the shared Philox generator:
    noise = philox.normal(seed, philox.stream_id(draw, k, direction), [B, Tk, C]),
    direction 0 = image->text (image queries), 1 = text->image;
  * decoder (docs/model.md §3): normalised patch tokens -> ScaleBlocks -> dot product with the mask-head query
    -> bilinear upsampling (align_corners=False).

Parameter names are exactly the official state-dict keys (docs/model.md §9). Everything is float32.
"""

import json
import math
from collections import OrderedDict
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import philox

# HF BertConfig hidden_dropout_prob = attention_probs_dropout_prob = 0.1; active only in training mode
# (docs/model.md §1.3 and §10.5). Not a config key: the official model has no switch for it.
TEXT_DROPOUT = 0.1
# Variance floor added after softplus in ProbCrossAttention (docs/model.md §2.3).
VARIANCE_EPS = 1e-6
# Stabiliser inside the entropy logarithms (docs/model.md §5).
ENTROPY_EPS = 1e-8
# Names containing one of these are trainable (docs/model.md §1.3); everything else is frozen.
TRAINABLE_PARTS = ("pvl_adapters", "mask_head", "upscale")

CONFIG_KEYS = (
    "name", "image_size", "patch_size", "vision_width", "vision_layers", "vision_heads", "vision_mlp_dim",
    "embed_dim", "text_vocab_size", "text_context_length", "text_width", "text_layers", "text_heads",
    "text_intermediate_dim", "text_max_positions", "text_type_vocab_size", "text_pad_id", "text_proj_hidden",
    "adapter_dim", "adapter_layers", "beta", "gate_init", "num_upscale", "vision_ln_eps", "text_ln_eps",
    "adapter_ln_eps", "decoder_ln_eps",
)


@dataclass(frozen=True)
class Config:
    name: str
    image_size: int
    patch_size: int
    vision_width: int
    vision_layers: int
    vision_heads: int
    vision_mlp_dim: int
    embed_dim: int
    text_vocab_size: int
    text_context_length: int
    text_width: int
    text_layers: int
    text_heads: int
    text_intermediate_dim: int
    text_max_positions: int
    text_type_vocab_size: int
    text_pad_id: int
    text_proj_hidden: int
    adapter_dim: int
    adapter_layers: tuple
    beta: float
    gate_init: float
    num_upscale: int
    vision_ln_eps: float
    text_ln_eps: float
    adapter_ln_eps: float
    decoder_ln_eps: float

    @staticmethod
    def from_dict(d):
        # Which parameters train and the training recipe are the engine's business; the
        # reference model takes its trainable set from TRAINABLE_PARTS. The CNN branch is built
        # by reference/cnn_branch.py from the `cnn_branch` entry.
        d = {k: v for k, v in d.items() if k not in ("trainable", "training", "cnn_branch")}
        keys = set(d)
        if keys != set(CONFIG_KEYS):
            raise ValueError(f"config keys differ: missing {sorted(set(CONFIG_KEYS) - keys)}, "
                             f"unexpected {sorted(keys - set(CONFIG_KEYS))}")
        d = dict(d)
        d["adapter_layers"] = tuple(int(i) for i in d["adapter_layers"])
        cfg = Config(**d)
        cfg.validate()
        return cfg

    @staticmethod
    def from_json(path):
        with open(path, encoding="utf-8") as f:
            return Config.from_dict(json.load(f))

    def to_dict(self):
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["adapter_layers"] = list(self.adapter_layers)
        return d

    def to_json(self):
        return json.dumps(self.to_dict(), indent=2)

    def validate(self):
        if self.image_size % self.patch_size:
            raise ValueError("image_size must be a multiple of patch_size")
        if self.vision_layers != self.text_layers:
            raise ValueError("the towers run in lock-step: vision_layers must equal text_layers")
        if self.vision_width % self.vision_heads or self.text_width % self.text_heads:
            raise ValueError("widths must be multiples of the head counts")
        if self.text_context_length > self.text_max_positions:
            raise ValueError("text_context_length exceeds text_max_positions")
        if list(self.adapter_layers) != sorted(set(self.adapter_layers)):
            raise ValueError("adapter_layers must be strictly increasing")
        if self.adapter_layers and not 0 <= self.adapter_layers[0] <= self.adapter_layers[-1] < self.vision_layers:
            raise ValueError("adapter_layers must be block indices")

    @property
    def grid(self):
        return self.image_size // self.patch_size

    @property
    def vision_tokens(self):
        return self.grid * self.grid + 1

    @property
    def upscaled_size(self):
        return self.grid * 2 ** self.num_upscale


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


class QuickGELU(nn.Module):
    def forward(self, x):
        return quick_gelu(x)


# ---------------------------------------------------------------------------------------------------
# Vision tower (open_clip VisualTransformer)


class PackedSelfAttention(nn.Module):
    """The maths of torch.nn.MultiheadAttention for self-attention without masks, with the same
    parameters (packed in_proj_weight [3W, W] / in_proj_bias [3W] in q, k, v order, out_proj)."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x):  # x [B, T, W]
        b, t, w = x.shape
        d = w // self.heads
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = (z.reshape(b, t, self.heads, d).transpose(1, 2) for z in qkv.split(w, dim=-1))
        attn = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(d), dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, t, w)
        return self.out_proj(out)


class VisionBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        w = cfg.vision_width
        self.attn = PackedSelfAttention(w, cfg.vision_heads)
        self.ln_1 = nn.LayerNorm(w, eps=cfg.vision_ln_eps)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(w, cfg.vision_mlp_dim)),
            ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(cfg.vision_mlp_dim, w)),
        ]))
        self.ln_2 = nn.LayerNorm(w, eps=cfg.vision_ln_eps)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class VisionBlocks(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.resblocks = nn.ModuleList([VisionBlock(cfg) for _ in range(cfg.vision_layers)])


class VisionTower(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        w = cfg.vision_width
        scale = w ** -0.5
        self.conv1 = nn.Conv2d(3, w, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(w))
        self.positional_embedding = nn.Parameter(scale * torch.randn(cfg.vision_tokens, w))
        self.ln_pre = nn.LayerNorm(w, eps=cfg.vision_ln_eps)
        self.transformer = VisionBlocks(cfg)
        self.ln_post = nn.LayerNorm(w, eps=cfg.vision_ln_eps)
        self.proj = nn.Parameter(scale * torch.randn(w, cfg.embed_dim))

    def embed(self, pixels):  # [B, 3, H, W] -> [B, 1 + grid^2, W]
        x = self.conv1(pixels).flatten(2).transpose(1, 2)  # patches in row-major (h, w) order
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding
        return self.ln_pre(x)

    def output_tokens(self, x):  # ln_post and proj on ALL tokens (docs/model.md §1.1)
        return self.ln_post(x) @ self.proj


# ---------------------------------------------------------------------------------------------------
# Text tower (HF BertModel without pooler, plus the UniMedCLIP MLP projection)


class BertEmbeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.text_vocab_size, cfg.text_width)
        self.position_embeddings = nn.Embedding(cfg.text_max_positions, cfg.text_width)
        self.token_type_embeddings = nn.Embedding(cfg.text_type_vocab_size, cfg.text_width)
        self.LayerNorm = nn.LayerNorm(cfg.text_width, eps=cfg.text_ln_eps)

    def forward(self, ids):
        length = ids.shape[1]
        x = self.word_embeddings(ids) + self.token_type_embeddings.weight[0]  # token type 0 everywhere
        x = x + self.position_embeddings.weight[:length]
        return F.dropout(self.LayerNorm(x), TEXT_DROPOUT, self.training)


class BertSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        w = cfg.text_width
        self.heads = cfg.text_heads
        self.query = nn.Linear(w, w)
        self.key = nn.Linear(w, w)
        self.value = nn.Linear(w, w)

    def forward(self, x, additive_mask):  # x [B, L, W], additive_mask [B, 1, 1, L]
        b, length, w = x.shape
        d = w // self.heads

        def heads(z):
            return z.reshape(b, length, self.heads, d).transpose(1, 2)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d) + additive_mask
        attn = F.dropout(torch.softmax(scores, dim=-1), TEXT_DROPOUT, self.training)
        return (attn @ v).transpose(1, 2).reshape(b, length, w)


class BertResidualOutput(nn.Module):
    """dense -> dropout -> LayerNorm(. + residual): BertSelfOutput and BertOutput."""

    def __init__(self, cfg, in_dim):
        super().__init__()
        self.dense = nn.Linear(in_dim, cfg.text_width)
        self.LayerNorm = nn.LayerNorm(cfg.text_width, eps=cfg.text_ln_eps)

    def forward(self, x, residual):
        return self.LayerNorm(F.dropout(self.dense(x), TEXT_DROPOUT, self.training) + residual)


class BertAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.self = BertSelfAttention(cfg)
        self.output = BertResidualOutput(cfg, cfg.text_width)

    def forward(self, x, additive_mask):
        return self.output(self.self(x, additive_mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.dense = nn.Linear(cfg.text_width, cfg.text_intermediate_dim)

    def forward(self, x):
        return F.gelu(self.dense(x))  # exact erf GELU


class BertLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertResidualOutput(cfg, cfg.text_intermediate_dim)

    def forward(self, x, additive_mask):
        h = self.attention(x, additive_mask)
        return self.output(self.intermediate(h), h)


class BertEncoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(cfg) for _ in range(cfg.text_layers)])


class BertModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)


class TextTower(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.pad_id = cfg.text_pad_id
        self.transformer = BertModel(cfg)
        self.proj = nn.Sequential(
            nn.Linear(cfg.text_width, cfg.text_proj_hidden, bias=False),
            nn.GELU(),
            nn.Linear(cfg.text_proj_hidden, cfg.embed_dim, bias=False),
        )
        for m in self.transformer.modules():  # BERT's own init (normal 0.02); irrelevant for a loaded model
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if isinstance(m, nn.Linear):
                    nn.init.zeros_(m.bias)

    def additive_mask(self, ids):
        """(1 - mask) * finfo(float32).min on keys, mask = ids != pad (HF extended attention mask)."""
        keep = (ids != self.pad_id).to(torch.float32)
        return ((1.0 - keep) * torch.finfo(torch.float32).min)[:, None, None, :]

    def pooled_embedding(self, x):  # [CLS] state of the last layer -> MLP projection, not normalised
        return self.proj(x[:, 0, :])


# ---------------------------------------------------------------------------------------------------
# PVL adapter (trainers/layers.py)


def adapter_noise(seed, draw, adapter, direction, shape, device=None):
    """The standard normal noise of one ProbCrossAttention V sample (shared Philox definition)."""
    z = philox.normal(seed, philox.stream_id(draw, adapter, direction), tuple(shape))
    return torch.from_numpy(z).to(device)


class ProbCrossAttention(nn.Module):
    def __init__(self, dim, beta, gate_init, ln_eps):
        super().__init__()
        self.beta = beta
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, 2 * dim)  # [mean | variance pre-activation]
        self.v_proj = nn.Linear(dim, 2 * dim)
        self.out_proj = nn.Linear(dim, dim)
        self.norm_k = nn.LayerNorm(dim, eps=ln_eps)
        self.norm_v = nn.LayerNorm(dim, eps=ln_eps)
        self.gate = nn.Parameter(torch.tensor(float(gate_init)))

    def forward(self, query, context, noise, record=None):
        """query [B, Tq, C], context [B, Tk, C], noise [B, Tk, C] -> [B, Tq, C]. When `record` is a
        dict, the internals are stored in it (q, k_mu, k_var, v_mu, v_var, s_mu, s_sigma, attn, out)."""
        c = query.shape[-1]
        q = self.q_proj(query)
        k_mu_raw, k_s = self.k_proj(context).split(c, dim=-1)
        k_mu = self.norm_k(k_mu_raw)
        k_var = F.softplus(k_s) + VARIANCE_EPS
        v_mu_raw, v_s = self.v_proj(context).split(c, dim=-1)
        v_mu = self.norm_v(v_mu_raw)
        v_var = F.softplus(v_s) + VARIANCE_EPS
        s_mu = (q @ k_mu.transpose(1, 2)) / math.sqrt(c)
        s_sigma = torch.sqrt((q * q) @ k_var.transpose(1, 2) / c)
        attn = torch.softmax(s_mu - self.beta * s_sigma, dim=-1)
        v_sample = v_mu + torch.sqrt(v_var) * noise
        out = attn @ v_sample
        g = torch.sigmoid(self.gate)
        y = g * self.out_proj(out) + (1 - g) * query
        if record is not None:
            record.update(q=q, k_mu=k_mu, k_var=k_var, v_mu=v_mu, v_var=v_var, s_mu=s_mu,
                          s_sigma=s_sigma, attn=attn, out=out)
        return y


class TwoWayLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        args = (cfg.adapter_dim, cfg.beta, cfg.gate_init, cfg.adapter_ln_eps)
        self.cross_attn_img_to_txt = ProbCrossAttention(*args)
        self.cross_attn_txt_to_img = ProbCrossAttention(*args)


class PVLAdapter(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        a = cfg.adapter_dim
        self.proj_vis_down = nn.Sequential(nn.Linear(cfg.vision_width, a, bias=False))
        self.proj_txt_down = nn.Linear(cfg.text_width, a, bias=False)
        self.proj_vis_up = nn.Linear(a, cfg.vision_width, bias=False)
        self.proj_txt_up = nn.Linear(a, cfg.text_width, bias=False)
        self.two_way = TwoWayLayer(cfg)

    def forward(self, vis, txt, noise_img_to_txt, noise_txt_to_img, record=None):
        """vis [B, Tv, Wv], txt [B, L, Wt] -> (dV, dT, v', t'). Image side first, then the text side
        attends to the UPDATED image tokens v' (docs/model.md §2.2). `record` receives the img->txt internals."""
        v = self.proj_vis_down(vis)
        t = self.proj_txt_down(txt)
        v_prime = self.two_way.cross_attn_img_to_txt(v, t, noise_img_to_txt, record)
        t_prime = self.two_way.cross_attn_txt_to_img(t, v_prime, noise_txt_to_img)
        return self.proj_vis_up(v_prime), self.proj_txt_up(t_prime), v_prime, t_prime


# ---------------------------------------------------------------------------------------------------
# Decoder (trainers/scale_block.py and compute_seg_logits)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels of each pixel of an NCHW tensor (timm LayerNorm2d)."""

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


class ScaleBlock(nn.Module):
    def __init__(self, dim, ln_eps):
        super().__init__()
        self.conv1 = nn.ConvTranspose2d(dim, dim, kernel_size=2, stride=2)  # weight [in, out, 2, 2]
        self.conv2 = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim, bias=False)
        self.norm = LayerNorm2d(dim, eps=ln_eps)

    def forward(self, x):
        return self.norm(self.conv2(F.gelu(self.conv1(x))))


# ---------------------------------------------------------------------------------------------------


class MedCLIPSeg(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        e = cfg.embed_dim
        self.vision_model = VisionTower(cfg)
        self.text_model = TextTower(cfg)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # unused (docs/model.md §10.11)
        self.pvl_adapters = nn.ModuleList([PVLAdapter(cfg) for _ in cfg.adapter_layers])
        self.mask_head = nn.Sequential(nn.Linear(e, e), nn.GELU(), nn.Linear(e, e), nn.GELU(), nn.Linear(e, e))
        self.upscale = nn.Sequential(*[ScaleBlock(e, cfg.decoder_ln_eps) for _ in range(cfg.num_upscale)])
        for name, p in self.named_parameters():
            p.requires_grad_(is_trainable(name))

    # -- encoders ----------------------------------------------------------------------------------

    def encode(self, pixels, ids, seed, draw, acts=None):
        """Both towers in lock-step with the adapters. Returns (image tokens [B, Tv, E], text embedding
        [B, E]). `acts`, when a dict, receives the named intermediates."""
        rec = acts if acts is not None else {}
        vision, bert = self.vision_model, self.text_model.transformer
        mask = self.text_model.additive_mask(ids)
        x_img = vision.embed(pixels)
        x_txt = bert.embeddings(ids)
        rec["act.vision.embed"], rec["act.text.embed"] = x_img, x_txt
        b = pixels.shape[0]
        for i, (block, layer) in enumerate(zip(vision.transformer.resblocks, bert.encoder.layer)):
            if i in self.cfg.adapter_layers:
                k = self.cfg.adapter_layers.index(i)
                c = self.cfg.adapter_dim
                noise_i2t = adapter_noise(seed, draw, k, 0, (b, x_txt.shape[1], c), pixels.device)
                noise_t2i = adapter_noise(seed, draw, k, 1, (b, x_img.shape[1], c), pixels.device)
                internals = {} if (acts is not None and k == 0) else None
                dv, dt, v_prime, t_prime = self.pvl_adapters[k](x_img, x_txt, noise_i2t, noise_t2i, internals)
                x_img, x_txt = x_img + dv, x_txt + dt
                rec[f"act.adapter.{k}.dv"], rec[f"act.adapter.{k}.dt"] = dv, dt
                rec[f"act.adapter.{k}.v_prime"], rec[f"act.adapter.{k}.t_prime"] = v_prime, t_prime
                rec[f"noise.adapter.{k}.dir0"], rec[f"noise.adapter.{k}.dir1"] = noise_i2t, noise_t2i
                for name, value in (internals or {}).items():
                    rec[f"act.adapter.{k}.img_to_txt.{name}"] = value
            x_img = block(x_img)
            x_txt = layer(x_txt, mask)
            rec[f"act.vision.block.{i}"], rec[f"act.text.block.{i}"] = x_img, x_txt
        tokens = vision.output_tokens(x_img)
        text_embedding = self.text_model.pooled_embedding(x_txt)
        rec["act.vision.tokens"], rec["act.text.embedding"] = tokens, text_embedding
        return tokens, text_embedding

    # -- decoder -----------------------------------------------------------------------------------

    def segment(self, tokens, text_embedding, acts=None):
        """Image tokens [B, Tv, E] and text embedding [B, E] -> logits [B, H, W] (docs/model.md §3)."""
        rec = acts if acts is not None else {}
        b, g = tokens.shape[0], self.cfg.grid
        t_n = text_embedding / text_embedding.norm(dim=-1, keepdim=True)
        patches = tokens[:, 1:, :]
        patches = patches / patches.norm(dim=-1, keepdim=True)
        patches = patches.reshape(b, g, g, -1).permute(0, 3, 1, 2)
        rec["act.decoder.patches"] = patches
        x = patches
        for i, block in enumerate(self.upscale):
            x = block(x)
            if i + 1 < len(self.upscale):  # the last one is act.decoder.upscaled
                rec[f"act.decoder.upscale.{i}"] = x
        query = self.mask_head(t_n)
        lowres = torch.einsum("bc,bchw->bhw", query, x).unsqueeze(1)
        size = self.cfg.image_size
        logits = F.interpolate(lowres, size=(size, size), mode="bilinear", align_corners=False).squeeze(1)
        rec["act.decoder.upscaled"], rec["act.decoder.query"] = x, query
        rec["act.logits_lowres"], rec["act.logits"] = lowres, logits
        return logits

    # -- entry points ------------------------------------------------------------------------------

    def forward(self, pixels, ids, seed, draw):
        """pixels [B, 3, H, W] (already normalised), ids [B, L] int64 -> (logits [B, H, W], dict of
        named intermediates incl. the noise used)."""
        acts = {}
        tokens, text_embedding = self.encode(pixels, ids, seed, draw, acts)
        logits = self.segment(tokens, text_embedding, acts)
        return logits, acts

    def predict(self, pixels, ids, seed, num_samples):
        """Monte-Carlo inference (docs/model.md §5): draw n uses draw index n. Returns (logits [N, B, H, W],
        mean probability [B, H, W], entropy [B, H, W] in nats)."""
        samples = torch.stack([self.segment(*self.encode(pixels, ids, seed, n)) for n in range(num_samples)])
        p = torch.sigmoid(samples).mean(dim=0)
        entropy = -(p * torch.log(p + ENTROPY_EPS) + (1 - p) * torch.log(1 - p + ENTROPY_EPS))
        return samples, p, entropy


def is_trainable(name):
    return any(part in name for part in TRAINABLE_PARTS)


def trainable_parameter_count(model):
    return sum(p.numel() for name, p in model.named_parameters() if is_trainable(name))


def expected_shapes(cfg):
    """Official state-dict key -> shape for a config, without allocating the weights."""
    with torch.device("meta"):
        model = MedCLIPSeg(cfg)
    return OrderedDict((k, tuple(v.shape)) for k, v in model.state_dict().items())


def load_model(cfg, state_dict):
    """A MedCLIPSeg in eval mode holding exactly `state_dict` (strict: same keys and shapes)."""
    model = MedCLIPSeg(cfg)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def numpy_state_dict(model):
    return OrderedDict((k, v.detach().cpu().numpy().astype(np.float32)) for k, v in model.state_dict().items())
