"""Checks of the PyTorch reference against independent formulations (torch built-ins, naive loops,
the numbers of docs/model.md §1.3) and of the committed fixtures.

    python -m unittest discover -s tools/tests -v
Optional: MEDCLIPSEG_OFFICIAL_REPO=<checkout of HealthX-Lab/MedCLIPSeg> also compares the PVL adapter
with the official trainers/layers.py (torch only).
"""

import importlib.util
import math
import os
import sys
import unittest

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

TOOLS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(TOOLS)
sys.path.insert(0, TOOLS)

from reference import philox  # noqa: E402
from reference.model import (  # noqa: E402
    Config, LayerNorm2d, MedCLIPSeg, PVLAdapter, PackedSelfAttention, ProbCrossAttention, BertLayer,
    expected_shapes, trainable_parameter_count)

PAPER = os.path.join(ROOT, "weights", "configs", "unimedclip-vit-b16.json")
TINY = os.path.join(ROOT, "weights", "configs", "tiny.json")


def tiny_model(seed=0):
    import make_fixtures
    model = MedCLIPSeg(Config.from_json(TINY))
    make_fixtures.randomize(model, seed)
    return model.eval()


class ConfigTests(unittest.TestCase):
    def test_paper_trainable_parameter_count_is_18_677_268(self):
        # docs/model.md §1.3: 10 adapters x 1,577,986 + mask head 787,968 + two ScaleBlocks 2,109,440
        with torch.device("meta"):
            model = MedCLIPSeg(Config.from_json(PAPER))
        self.assertEqual(trainable_parameter_count(model), 18_677_268)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.assertEqual(trainable, 18_677_268)

    def test_paper_state_dict_keys(self):
        shapes = expected_shapes(Config.from_json(PAPER))
        self.assertNotIn("text_model.transformer.embeddings.position_ids", shapes)
        self.assertEqual(shapes["vision_model.transformer.resblocks.11.attn.in_proj_weight"], (2304, 768))
        self.assertEqual(shapes["vision_model.positional_embedding"], (197, 768))
        self.assertEqual(shapes["vision_model.proj"], (768, 512))
        self.assertEqual(shapes["text_model.transformer.embeddings.word_embeddings.weight"], (30522, 768))
        self.assertEqual(shapes["text_model.proj.0.weight"], (640, 768))
        self.assertEqual(shapes["text_model.proj.2.weight"], (512, 640))
        self.assertEqual(shapes["pvl_adapters.9.two_way.cross_attn_txt_to_img.k_proj.weight"], (512, 256))
        self.assertEqual(shapes["pvl_adapters.0.proj_vis_down.0.weight"], (256, 768))
        self.assertEqual(shapes["pvl_adapters.0.two_way.cross_attn_img_to_txt.gate"], ())
        self.assertEqual(shapes["upscale.1.conv1.weight"], (512, 512, 2, 2))
        self.assertEqual(shapes["upscale.1.conv2.weight"], (512, 1, 3, 3))
        self.assertEqual(shapes["mask_head.4.bias"], (512,))
        self.assertNotIn("pvl_adapters.10.proj_txt_up.weight", shapes)
        self.assertEqual(shapes["logit_scale"], ())

    def test_config_rejects_unknown_or_missing_keys(self):
        d = Config.from_json(TINY).to_dict()
        with self.assertRaisesRegex(ValueError, "unexpected.*extra"):
            Config.from_dict({**d, "extra": 1})
        del d["beta"]
        with self.assertRaisesRegex(ValueError, "missing.*beta"):
            Config.from_dict(d)


class LayerTests(unittest.TestCase):
    def test_vision_attention_matches_nn_multihead_attention(self):
        torch.manual_seed(1)
        ours = PackedSelfAttention(32, 4)
        with torch.no_grad():
            ours.in_proj_bias.uniform_(-0.5, 0.5)
        ref = nn.MultiheadAttention(32, 4, batch_first=True)
        ref.load_state_dict(ours.state_dict())
        x = torch.randn(3, 17, 32)
        want, _ = ref(x, x, x, need_weights=False)
        # float32 rounding of two differently ordered computations of O(1) values
        torch.testing.assert_close(ours(x), want, rtol=1e-5, atol=1e-5)

    def test_bert_layer_matches_post_ln_transformer_encoder_layer(self):
        cfg = Config.from_json(TINY)
        torch.manual_seed(2)
        ours = BertLayer(cfg).eval()
        for p in ours.parameters():
            with torch.no_grad():
                p.uniform_(-0.3, 0.3)
        w = cfg.text_width
        ref = nn.TransformerEncoderLayer(w, cfg.text_heads, cfg.text_intermediate_dim, dropout=0.0,
                                         activation="gelu", layer_norm_eps=cfg.text_ln_eps, batch_first=True,
                                         norm_first=False)
        a, o = ours.attention.self, ours.attention.output
        with torch.no_grad():
            ref.self_attn.in_proj_weight.copy_(torch.cat([a.query.weight, a.key.weight, a.value.weight]))
            ref.self_attn.in_proj_bias.copy_(torch.cat([a.query.bias, a.key.bias, a.value.bias]))
            ref.self_attn.out_proj.load_state_dict(o.dense.state_dict())
            ref.norm1.load_state_dict(o.LayerNorm.state_dict())
            ref.linear1.load_state_dict(ours.intermediate.dense.state_dict())
            ref.linear2.load_state_dict(ours.output.dense.state_dict())
            ref.norm2.load_state_dict(ours.output.LayerNorm.state_dict())
        ref.train()  # training mode with p=0 keeps torch off its fused fast path (which zeroes pad rows)
        x = torch.randn(2, 16, w)
        pad = torch.zeros(2, 16, dtype=torch.bool)
        pad[1, 7:] = True
        additive = torch.where(pad, torch.finfo(torch.float32).min, 0.0)[:, None, None, :]
        # float32 rounding through two layer norms
        torch.testing.assert_close(ours(x, additive), ref(x, src_key_padding_mask=pad), rtol=1e-5, atol=2e-5)

    def test_prob_cross_attention_matches_naive_float64_loops(self):
        torch.manual_seed(3)
        c, tq, tk = 8, 5, 6
        att = ProbCrossAttention(c, beta=2.35, gate_init=0.3, ln_eps=1e-5)
        with torch.no_grad():
            for p in att.parameters():
                p.uniform_(-0.8, 0.8)
        x, z, noise = torch.randn(2, tq, c), torch.randn(2, tk, c), torch.randn(2, tk, c)
        got = att(x, z, noise).double()

        P = {k: v.double() for k, v in att.state_dict().items()}

        def lin(name, v):
            return P[f"{name}.weight"] @ v + P[f"{name}.bias"]

        def ln(name, v):
            mu = v.mean()
            var = ((v - mu) ** 2).mean()
            return (v - mu) / math.sqrt(var + 1e-5) * P[f"{name}.weight"] + P[f"{name}.bias"]

        def softplus(v):
            return torch.log1p(torch.exp(v))

        g = 1 / (1 + math.exp(-P["gate"].item()))
        want = torch.zeros(2, tq, c, dtype=torch.float64)
        for b in range(2):
            zs = z[b].double()
            keys = [lin("k_proj", zs[j]) for j in range(tk)]
            vals = [lin("v_proj", zs[j]) for j in range(tk)]
            k_mu = [ln("norm_k", k[:c]) for k in keys]
            k_var = [softplus(k[c:]) + 1e-6 for k in keys]
            v_s = [ln("norm_v", v[:c]) + torch.sqrt(softplus(v[c:]) + 1e-6) * noise[b, j].double()
                   for j, v in enumerate(vals)]
            for i in range(tq):
                q = lin("q_proj", x[b, i].double())
                scores = torch.tensor([float(q @ k_mu[j]) / math.sqrt(c)
                                       - 2.35 * math.sqrt(float((q * q) @ k_var[j]) / c) for j in range(tk)])
                a = torch.softmax(scores.double(), 0)
                o = sum(a[j] * v_s[j] for j in range(tk))
                want[b, i] = g * lin("out_proj", o) + (1 - g) * x[b, i].double()
        # float32 forward vs float64 loops; values are O(1)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

    def test_layernorm2d_normalises_channels_per_pixel(self):
        torch.manual_seed(4)
        norm = LayerNorm2d(6, eps=1e-6)
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
        x = torch.randn(2, 6, 3, 5, dtype=torch.float64)
        mu = x.mean(1, keepdim=True)
        var = x.var(1, unbiased=False, keepdim=True)
        want = (x - mu) / torch.sqrt(var + 1e-6) * norm.weight.double()[:, None, None] + norm.bias.double()[:, None, None]
        torch.testing.assert_close(norm(x.float()).double(), want, rtol=1e-5, atol=1e-5)


class ModelTests(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.cfg = Config.from_json(TINY)
        cls.model = tiny_model()
        g = torch.Generator().manual_seed(5)
        cls.pixels = torch.randn(2, 3, 32, 32, generator=g)
        ids = torch.zeros(2, 16, dtype=torch.int64)
        ids[0, :10] = torch.randint(5, cls.cfg.text_vocab_size, (10,), generator=g)
        ids[1, :5] = torch.randint(5, cls.cfg.text_vocab_size, (5,), generator=g)
        ids[:, 0] = 2
        cls.ids = ids

    def test_shapes_and_noise_streams(self):
        with torch.no_grad():
            logits, acts = self.model(self.pixels, self.ids, seed=11, draw=7)
        self.assertEqual(tuple(logits.shape), (2, 32, 32))
        self.assertEqual(tuple(acts["act.logits_lowres"].shape), (2, 1, 16, 16))
        self.assertEqual(tuple(acts["act.decoder.upscaled"].shape), (2, 24, 16, 16))
        for k in range(2):
            for d, tk in ((0, 16), (1, 17)):
                want = philox.normal(11, (7 << 16) | (k << 1) | d, (2, tk, 16))
                np.testing.assert_array_equal(acts[f"noise.adapter.{k}.dir{d}"].numpy(), want)

    def test_draws_differ_and_predict_reuses_forward(self):
        with torch.no_grad():
            samples, p, h = self.model.predict(self.pixels, self.ids, seed=11, num_samples=3)
            second, _ = self.model(self.pixels, self.ids, seed=11, draw=1)
        torch.testing.assert_close(samples[1], second, rtol=0, atol=0)
        self.assertGreater((samples[0] - samples[1]).abs().max().item(), 1e-3)  # noise reaches the logits
        want_p = torch.sigmoid(samples).mean(0)
        torch.testing.assert_close(p, want_p, rtol=0, atol=0)
        pd = want_p.double()
        want_h = -(pd * torch.log(pd + 1e-8) + (1 - pd) * torch.log(1 - pd + 1e-8))
        torch.testing.assert_close(h.double(), want_h, rtol=1e-5, atol=1e-6)

    def test_pad_positions_do_not_reach_text_embedding_without_adapters(self):
        # BERT masks pads as keys, so without adapters the [CLS] path ignores pad-token ids. With
        # adapters it does not (docs/model.md §10.4: no mask inside the adapter): changing a pad id's embedding
        # row must then change the output.
        shift = torch.linspace(-1, 1, self.cfg.text_width)  # not a uniform shift, which LayerNorm removes
        model = tiny_model()
        with torch.no_grad():
            _, acts = model(self.pixels, self.ids, 1, 0)
            model.text_model.transformer.embeddings.word_embeddings.weight[0].add_(shift)
            _, acts2 = model(self.pixels, self.ids, 1, 0)
        self.assertGreater((acts["act.text.embedding"] - acts2["act.text.embedding"]).abs().max().item(), 1e-4)
        no_adapter = tiny_model()
        no_adapter.cfg = Config.from_dict({**self.cfg.to_dict(), "adapter_layers": []})
        with torch.no_grad():
            _, a1 = no_adapter(self.pixels, self.ids, 1, 0)
            no_adapter.text_model.transformer.embeddings.word_embeddings.weight[0].add_(shift)
            _, a2 = no_adapter(self.pixels, self.ids, 1, 0)
        torch.testing.assert_close(a1["act.text.embedding"], a2["act.text.embedding"], rtol=0, atol=0)

    def test_adapter_positions(self):
        # adapter k runs before block adapter_layers[k]: zeroing adapter 1's up-projections makes
        # block 2 see exactly block 1's output.
        model = tiny_model()
        with torch.no_grad():
            model.pvl_adapters[1].proj_vis_up.weight.zero_()
            _, acts = model(self.pixels, self.ids, 1, 0)
            want = model.vision_model.transformer.resblocks[2](acts["act.vision.block.1"])
        torch.testing.assert_close(acts["act.vision.block.2"], want, rtol=0, atol=0)

    def test_training_mode_enables_bert_dropout_only(self):
        model = tiny_model()
        model.train()
        torch.manual_seed(0)
        with torch.no_grad():
            _, a = model(self.pixels, self.ids, 1, 0)
            _, b = model(self.pixels, self.ids, 1, 0)
        torch.testing.assert_close(a["act.vision.block.0"], b["act.vision.block.0"], rtol=0, atol=0)
        self.assertGreater((a["act.text.embed"] - b["act.text.embed"]).abs().max().item(), 0)


class FixtureTests(unittest.TestCase):
    def test_committed_fixtures_are_current(self):
        import make_fixtures
        from tokenizers import Tokenizer
        cfg = Config.from_json(make_fixtures.CONFIG_PATH)
        files = make_fixtures.serialise(cfg, Tokenizer.from_file(make_fixtures.TOKENIZER_PATH))
        for name, blob in files.items():
            with open(os.path.join(ROOT, "tests", "fixtures", name), "rb") as f:
                self.assertTrue(f.read() == blob, f"{name} differs from a regeneration: run tools/make_fixtures.py")
        total = sum(os.path.getsize(os.path.join(ROOT, "tests", "fixtures", n)) for n in files)
        self.assertLess(total, 2 * 1024 * 1024)

    def test_fixture_weights_load_into_reference(self):
        from safetensors.torch import load_file
        weights = load_file(os.path.join(ROOT, "tests", "fixtures", "tiny_weights.safetensors"))
        forward = load_file(os.path.join(ROOT, "tests", "fixtures", "tiny_forward.safetensors"))
        model = MedCLIPSeg(Config.from_json(TINY))
        model.load_state_dict(weights, strict=True)
        model.eval()
        with torch.no_grad():
            logits, _ = model(forward["input.pixels"], forward["input.ids"], 20261123, 0)
        torch.testing.assert_close(logits, forward["act.logits"], rtol=0, atol=0)


@unittest.skipUnless(os.environ.get("MEDCLIPSEG_OFFICIAL_REPO"), "set MEDCLIPSEG_OFFICIAL_REPO to compare with trainers/layers.py")
class OfficialCodeTests(unittest.TestCase):
    def test_pvl_adapter_matches_official_layers_py(self):
        path = os.path.join(os.environ["MEDCLIPSEG_OFFICIAL_REPO"], "trainers", "layers.py")
        spec = importlib.util.spec_from_file_location("official_layers", path)
        official = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(official)
        cfg = Config.from_json(TINY)
        ours = PVLAdapter(cfg)
        torch.manual_seed(6)
        with torch.no_grad():
            for p in ours.parameters():
                p.uniform_(-0.7, 0.7)
        theirs = official.PVL_Adapter(cfg.vision_width, cfg.text_width, cfg.adapter_dim, cfg.beta, cfg.gate_init)
        theirs.load_state_dict(ours.state_dict(), strict=True)
        vis, txt = torch.randn(2, 17, cfg.vision_width), torch.randn(2, 16, cfg.text_width)
        n0, n1 = torch.randn(2, 16, cfg.adapter_dim), torch.randn(2, 17, cfg.adapter_dim)
        queue = [n0, n1]
        original = torch.randn_like
        official.torch.randn_like = lambda t: queue.pop(0)  # the official code draws V noise with randn_like
        try:
            want_v, want_t = theirs(vis, txt)
        finally:
            official.torch.randn_like = original
        dv, dt, _, _ = ours(vis, txt, n0, n1)
        torch.testing.assert_close(dv, want_v, rtol=0, atol=0)
        torch.testing.assert_close(dt, want_t, rtol=0, atol=0)

    def test_whole_forward_matches_official_encode_and_decode(self):
        """The official CustomCLIP.encode_text_image + compute_seg_logits, run on the tiny fixture with
        the official VisualTransformer, PVL_Adapter and ScaleBlock. transformers/timm/torchvision are
        not installed, so they are stubbed: BERT is our BertModel (checked separately against
        nn.TransformerEncoderLayer) and timm's LayerNorm2d is ours (checked separately)."""
        import types
        from safetensors.torch import load_file
        from reference.model import LayerNorm2d as OurLayerNorm2d, TextTower
        repo = os.environ["MEDCLIPSEG_OFFICIAL_REPO"]

        def package(name, path):
            mod = types.ModuleType(name)
            mod.__path__ = [path]
            sys.modules[name] = mod
            return mod

        def module(name, **attrs):
            mod = types.ModuleType(name)
            mod.__dict__.update(attrs)
            sys.modules[name] = mod
            return mod

        saved = {k: sys.modules.get(k) for k in ("timm", "timm.layers", "open_clip_lib", "open_clip_lib.hf_model",
                                                  "open_clip_lib.timm_model", "open_clip_lib.utils", "trainers")}
        try:
            module("timm")
            module("timm.layers", LayerNorm2d=lambda dim: OurLayerNorm2d(dim, eps=1e-6))
            oc = package("open_clip_lib", os.path.join(repo, "open_clip_lib"))
            oc.create_model_and_transforms = oc.HFTokenizer = oc.get_mean_std = None
            module("open_clip_lib.hf_model", HFTextEncoder=None)
            module("open_clip_lib.timm_model", TimmModel=None)
            module("open_clip_lib.utils", freeze_batch_norm_2d=None, to_2tuple=lambda x: (x, x))
            package("trainers", os.path.join(repo, "trainers"))
            oc_model = importlib.import_module("open_clip_lib.model")
            official = importlib.import_module("trainers.medclipseg_unimedclip")
            layers = importlib.import_module("trainers.layers")
        finally:
            for k, v in saved.items():
                if v is None:
                    sys.modules.pop(k, None)
                else:
                    sys.modules[k] = v

        cfg = Config.from_json(TINY)
        fixtures = os.path.join(ROOT, "tests", "fixtures")
        weights = load_file(os.path.join(fixtures, "tiny_weights.safetensors"))
        fwd = load_file(os.path.join(fixtures, "tiny_forward.safetensors"))

        class Embeddings(nn.Module):  # HF BertEmbeddings(inputs_embeds=...) semantics on our parameters
            def __init__(self, ours):
                super().__init__()
                self.ours = ours
                self.word_embeddings = ours.word_embeddings

            def forward(self, inputs_embeds):
                e = self.ours
                x = inputs_embeds + e.token_type_embeddings.weight[0] + e.position_embeddings.weight[:inputs_embeds.shape[1]]
                return e.LayerNorm(x)

        class Layer(nn.Module):  # HF BertLayer call convention: returns a tuple
            def __init__(self, ours):
                super().__init__()
                self.ours = ours

            def forward(self, x, attention_mask):
                return (self.ours(x, attention_mask),)

        text = TextTower(cfg).eval()  # outside m, so m.eval() does not reach it
        text.load_state_dict({k[len("text_model."):]: v for k, v in weights.items() if k.startswith("text_model.")})
        text_model = types.SimpleNamespace(
            transformer=types.SimpleNamespace(
                embeddings=Embeddings(text.transformer.embeddings), dtype=torch.float32,
                encoder=types.SimpleNamespace(layer=[Layer(l) for l in text.transformer.encoder.layer])),
            proj=text.proj, config=types.SimpleNamespace(pad_token_id=cfg.text_pad_id))

        m = official.CustomCLIP.__new__(official.CustomCLIP)
        nn.Module.__init__(m)
        m.vision_model = oc_model.VisualTransformer(cfg.image_size, cfg.patch_size, cfg.vision_width, cfg.vision_layers,
                                                    cfg.vision_heads, cfg.vision_mlp_dim / cfg.vision_width,
                                                    cfg.embed_dim, act_layer=oc_model.QuickGELU)
        object.__setattr__(m, "text_model", text_model)
        m.fusion_stages, m.patch_size, m.im_size, m.dtype = list(cfg.adapter_layers), cfg.patch_size, cfg.image_size, torch.float32
        m.output_hidden_states = False
        e = cfg.embed_dim
        m.mask_head = nn.Sequential(nn.Linear(e, e), nn.GELU(), nn.Linear(e, e), nn.GELU(), nn.Linear(e, e))
        m.upscale = nn.Sequential(*[importlib.import_module("trainers.scale_block").ScaleBlock(e)
                                    for _ in range(cfg.num_upscale)])
        m.pvl_adapters = nn.ModuleList([layers.PVL_Adapter(cfg.vision_width, cfg.text_width, cfg.adapter_dim,
                                                           cfg.beta, cfg.gate_init) for _ in cfg.adapter_layers])
        # everything but the (stubbed) text tower and the unused logit_scale; strict = same key set
        m.load_state_dict({k: v for k, v in weights.items() if not k.startswith("text_model.") and k != "logit_scale"},
                          strict=True)
        m.eval()

        noise = [fwd[f"noise.adapter.{k}.dir{d}"] for k in range(len(cfg.adapter_layers)) for d in (0, 1)]
        original = torch.randn_like
        torch.randn_like = lambda t: noise.pop(0)
        try:
            with torch.no_grad():
                ids = fwd["input.ids"]
                prompts = text_model.transformer.embeddings.word_embeddings(ids)
                tokens, text_embedding = m.encode_text_image(ids, prompts, fwd["input.pixels"])
                logits, _ = m.compute_seg_logits(tokens, text_embedding, 2, cfg.image_size, cfg.image_size)
        finally:
            torch.randn_like = original
        self.assertEqual(noise, [])
        # torch's MultiheadAttention vs our attention: float32 rounding differences only
        torch.testing.assert_close(tokens, fwd["act.vision.tokens"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(text_embedding, fwd["act.text.embedding"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits, fwd["act.logits"], rtol=1e-5, atol=1e-5)


if __name__ == "__main__":
    unittest.main()
