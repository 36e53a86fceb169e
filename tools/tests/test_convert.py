"""Tests of tools/convert_checkpoint.py.

    python tools/tests/test_convert.py            # the tests (~1-2 min)
    python tools/tests/test_convert.py --write-full-size DIR
        leaves the converted full-size (paper config) random checkpoint in DIR for the Rust side:
        DIR/model.safetensors (~860 MB), DIR/config.json and DIR/reference_io.safetensors (one input,
        its logits for seed 20261123 draw 0, and a few named activations).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import unittest

import torch
from safetensors import safe_open
from safetensors.torch import load_file

TOOLS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(TOOLS)
sys.path.insert(0, TOOLS)

import convert_checkpoint as cc  # noqa: E402
import make_fixtures  # noqa: E402
from reference.model import Config, MedCLIPSeg  # noqa: E402
from reference.safetensors_io import save_file  # noqa: E402
from reference.tokenizer import build_tokenizer_from_file, encode_padded  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

PYTHON = sys.executable
PAPER = os.path.join(ROOT, "weights", "configs", "unimedclip-vit-b16.json")
TINY = os.path.join(ROOT, "weights", "configs", "tiny.json")
SEED = 20261123


def random_model(config_path, seed):
    model = MedCLIPSeg(Config.from_json(config_path))
    make_fixtures.randomize(model, seed)
    return model.eval()


def full_size_round_trip(out_dir):
    """Paper-config model with random values -> official-style .pth -> converter -> exact comparison."""
    model = random_model(PAPER, SEED)
    state = model.state_dict()
    with tempfile.TemporaryDirectory() as tmp:
        pth = os.path.join(tmp, "MedCLIPSeg_unimedclip_ViT-B-16_latest.pth")
        # official train.py layout, incl. the BERT position_ids buffer older transformers versions saved
        official = dict(state)
        official["text_model.transformer.embeddings.position_ids"] = torch.arange(512)[None, :]
        torch.save({"model": official, "epoch": 100, "optimizer": {}, "scheduler": {}}, pth)
        result = subprocess.run([PYTHON, os.path.join(TOOLS, "convert_checkpoint.py"), "model", "--checkpoint", pth,
                                 "--out", out_dir, "--config", PAPER], capture_output=True, text=True)
    if result.returncode != 0:
        raise AssertionError(f"converter failed:\n{result.stdout}\n{result.stderr}")
    print(result.stdout, end="")
    converted = load_file(os.path.join(out_dir, "model.safetensors"))
    assert set(converted) == set(state), sorted(set(converted) ^ set(state))[:10]
    for key, value in state.items():
        assert converted[key].dtype == torch.float32, key
        assert converted[key].shape == value.shape, key
        assert torch.equal(converted[key], value), f"{key} differs after conversion"
    assert Config.from_json(os.path.join(out_dir, "config.json")) == Config.from_json(PAPER)
    assert "dropped text_model.transformer.embeddings.position_ids" in result.stdout
    return model


def write_reference_io(model, out_dir):
    """One full-size forward pass (batch 1, draw 0) for the Rust loader's smoke parity test."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(SEED + 2)
    pixels = torch.randn(1, 3, cfg.image_size, cfg.image_size, generator=g)
    ids = torch.zeros(1, cfg.text_context_length, dtype=torch.int64)
    ids[0, 1:20] = torch.randint(1000, cfg.text_vocab_size, (19,), generator=g)
    ids[0, 0], ids[0, 20] = 2, 3  # [CLS] / [SEP] ids of the BiomedBERT vocabulary
    with torch.no_grad():
        logits, acts = model(pixels, ids, SEED, 0)
    keep = ["act.vision.embed", "act.text.embed", "act.vision.block.0", "act.text.block.0", "act.adapter.0.dv",
            "act.adapter.0.dt", "act.vision.tokens", "act.text.embedding", "act.decoder.query", "act.logits_lowres"]
    tensors = {"input.pixels": pixels, "input.ids": ids, "act.logits": logits}
    tensors.update({k: acts[k] for k in keep})
    save_file(tensors, os.path.join(out_dir, "reference_io.safetensors"),
              {"seed": str(SEED), "draw": "0", "generator": "tools/tests/test_convert.py --write-full-size"})


class FullSizeTests(unittest.TestCase):
    def test_official_pth_round_trip_is_exact(self):
        with tempfile.TemporaryDirectory() as out:
            full_size_round_trip(out)


class TinyConversionTests(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.model = random_model(TINY, 7)
        cls.state = cls.model.state_dict()

    def convert(self, obj, **kw):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "ckpt.pt")
            torch.save(obj, path)
            lines = []
            tensors, missing = cc.convert_model(path, os.path.join(tmp, "out"), TINY, log=lines.append, **kw)
            with safe_open(os.path.join(tmp, "out", "model.safetensors"), "pt") as f:
                meta = f.metadata()
                written = {k: f.get_tensor(k) for k in f.keys()}
        return written, missing, "\n".join(lines), meta

    def test_bare_state_dict_with_module_prefix(self):
        written, missing, log, meta = self.convert({f"module.{k}": v for k, v in self.state.items()})
        self.assertEqual(missing, [])
        self.assertEqual(meta["complete"], "true")
        self.assertIn('stripped the "module." prefix', log)
        for k, v in self.state.items():
            self.assertTrue(torch.equal(written[k], v), k)

    def test_unimedclip_backbone_only(self):
        # UniMedCLIP / open_clip layout: {"state_dict": {"module.visual.*", "module.text_encoder.*", ...}}
        backbone = {}
        for k, v in self.state.items():
            if k.startswith("vision_model."):
                backbone["module.visual." + k[len("vision_model."):]] = v
            elif k.startswith("text_model."):
                backbone["module.text_encoder." + k[len("text_model."):]] = v.half()  # also check the fp32 cast
            elif k == "logit_scale":
                backbone["module.logit_scale"] = v
        backbone["module.text_encoder.transformer.embeddings.position_ids"] = torch.arange(20)[None]
        backbone["module.text_encoder.transformer.pooler.dense.weight"] = torch.zeros(48, 48)
        written, missing, log, meta = self.convert({"epoch": 32, "state_dict": backbone})
        self.assertEqual(meta["complete"], "false")
        self.assertEqual(sorted(missing), sorted(k for k in self.state if k.split(".")[0] in
                                                 ("pvl_adapters", "mask_head", "upscale")))
        self.assertIn('renamed prefix "visual." -> "vision_model."', log)
        self.assertIn('renamed prefix "text_encoder." -> "text_model."', log)
        self.assertIn("dropped text_model.transformer.pooler.dense.weight", log)
        self.assertIn("cast torch.float16 tensors to float32", log)
        self.assertIn("pvl_adapters.0:", log)
        self.assertIn("mask_head:", log)
        self.assertTrue(torch.equal(written["vision_model.proj"], self.state["vision_model.proj"]))
        word = "text_model.transformer.embeddings.word_embeddings.weight"
        self.assertEqual(written[word].dtype, torch.float32)
        torch.testing.assert_close(written[word], self.state[word].half().float(), rtol=0, atol=0)

    def test_wrong_shape_names_key_and_both_shapes(self):
        bad = dict(self.state)
        bad["pvl_adapters.1.proj_txt_up.weight"] = torch.zeros(48, 17)
        with self.assertRaises(cc.ConversionError) as ctx:
            self.convert({"model": bad})
        self.assertIn("pvl_adapters.1.proj_txt_up.weight: expected shape [48, 16], found [48, 17]", str(ctx.exception))

    def test_unexpected_and_missing_frozen_keys_fail(self):
        bad = dict(self.state)
        bad["vision_model.extra"] = torch.zeros(3)
        del bad["vision_model.ln_post.bias"]
        with self.assertRaises(cc.ConversionError) as ctx:
            self.convert({"model": bad})
        self.assertIn("vision_model.extra: unexpected key", str(ctx.exception))
        self.assertIn("vision_model.ln_post.bias: missing (expected shape [32])", str(ctx.exception))

    def test_cli_help_and_error_exit_code(self):
        help_out = subprocess.run([PYTHON, os.path.join(TOOLS, "convert_checkpoint.py"), "--help"],
                                  capture_output=True, text=True)
        self.assertEqual(help_out.returncode, 0)
        self.assertIn("vocab", help_out.stdout)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "bad.pth")
            torch.save({"model": {"logit_scale": torch.zeros(())}}, path)
            run = subprocess.run([PYTHON, os.path.join(TOOLS, "convert_checkpoint.py"), "model", "--checkpoint", path,
                                  "--out", os.path.join(tmp, "o"), "--config", TINY], capture_output=True, text=True)
        self.assertEqual(run.returncode, 1)
        self.assertIn("error: checkpoint does not match config 'tiny'", run.stderr)


class CnnBranchTests(unittest.TestCase):
    """A checkpoint laid out as VLSM-Ensemble's code saves it (UNet-D under "decoder2." with its
    unused gn1 and the step counters, the fusion layers at the top) goes into a tiny model folder
    under "cnn." unchanged, and the config gains the branch with the repeated decoder convolutions."""

    def test_paper_layout_converts_exactly(self):
        fixture = load_file(os.path.join(ROOT, "tests", "fixtures", "tiny_cnn_weights.safetensors"))
        paper = {}
        for key, value in fixture.items():
            rest = key[len("cnn."):]
            if rest.split(".")[0] in cc.CNN_FUSION_MODULES:
                paper[rest] = value
            else:
                paper[f"decoder2.{rest}"] = value
                if rest.endswith("running_var"):
                    paper[f"decoder2.{rest[:-len('running_var')]}num_batches_tracked"] = torch.tensor(7)
        paper["decoder2.gn1.weight"] = torch.ones(8)
        paper["decoder2.gn1.bias"] = torch.zeros(8)
        paper["clipseg.some.weight"] = torch.zeros(3)  # the rest of the wrapper is ignored
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = os.path.join(tmp, "vlsm.pth")
            torch.save({"model": paper}, ckpt)
            model_dir = os.path.join(tmp, "model")
            os.makedirs(model_dir)
            save_file(load_file(os.path.join(ROOT, "tests", "fixtures", "tiny_weights.safetensors")),
                      os.path.join(model_dir, "model.safetensors"))
            with open(TINY, encoding="utf-8") as f, open(os.path.join(model_dir, "config.json"), "w") as g:
                g.write(f.read())
            added = cc.convert_cnn(ckpt, model_dir, log=lambda _: None)
            self.assertEqual(set(added), set(fixture))
            written = load_file(os.path.join(model_dir, "model.safetensors"))
            for key, value in fixture.items():
                self.assertTrue(torch.equal(written[key], value), key)
            with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
                config = json.load(f)
            self.assertEqual(config["cnn_branch"]["width"], 0.125)
            self.assertTrue(config["cnn_branch"]["repeat_decoder_conv"])
            self.assertIn("cnn.", config["trainable"])

    def test_wrong_width_names_the_key(self):
        fixture = load_file(os.path.join(ROOT, "tests", "fixtures", "tiny_cnn_weights.safetensors"))
        paper = {f"unet.{k[4:]}": v for k, v in fixture.items()}
        paper["unet.conv12.weight"] = torch.zeros(8, 8, 1, 1)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = os.path.join(tmp, "vlsm.pth")
            torch.save(paper, ckpt)
            model_dir = os.path.join(tmp, "model")
            os.makedirs(model_dir)
            with open(TINY, encoding="utf-8") as f, open(os.path.join(model_dir, "config.json"), "w") as g:
                g.write(f.read())
            with self.assertRaisesRegex(cc.ConversionError, "conv12.weight: expected shape"):
                cc.convert_cnn(ckpt, model_dir, log=lambda _: None)


class VocabTests(unittest.TestCase):
    def test_vocab_round_trip(self):
        with tempfile.TemporaryDirectory() as tmp:
            vocab = os.path.join(tmp, "vocab.txt")
            tokens = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "tumor", "##s", "benign", "breast",
                      "ultra", "##sound", "image", ".", "no"]
            with open(vocab, "w", encoding="utf-8") as f:
                f.write("\n".join(tokens) + "\n")
            out = os.path.join(tmp, "tok", "tokenizer.json")
            run = subprocess.run([PYTHON, os.path.join(TOOLS, "convert_checkpoint.py"), "vocab", "--vocab", vocab,
                                  "--out", out], capture_output=True, text=True)
            self.assertEqual(run.returncode, 0, run.stderr)
            tok = Tokenizer.from_file(out)
            self.assertEqual(tok.get_vocab(), {t: i for i, t in enumerate(tokens)})
            enc = tok.encode("Benign TUMORS, breast Ultrasound image. Café")
            self.assertEqual(enc.tokens, ["[CLS]", "benign", "tumor", "##s", "[UNK]", "breast", "ultra", "##sound",
                                          "image", ".", "[UNK]", "[SEP]"])
            self.assertEqual(encode_padded(tok, ["no tumor"], 6), [[3, 14, 6, 4, 0, 0]])
            self.assertEqual(encode_padded(tok, ["no tumors no tumors"], 6), [[3, 14, 6, 7, 14, 4]])
            same = build_tokenizer_from_file(vocab)
            self.assertEqual(same.to_str(), tok.to_str())

    def test_tiny_tokenizer_is_current(self):
        # weights/tiny/tokenizer.json is what the pipeline builds from weights/tiny/vocab.txt
        built = build_tokenizer_from_file(os.path.join(ROOT, "weights", "tiny", "vocab.txt"))
        saved = Tokenizer.from_file(os.path.join(ROOT, "weights", "tiny", "tokenizer.json"))
        self.assertEqual(built.to_str(), saved.to_str())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write-full-size", metavar="DIR",
                        help="write the converted full-size random checkpoint to DIR instead of running the tests")
    args, rest = parser.parse_known_args()
    if args.write_full_size:
        torch.set_num_threads(max(1, os.cpu_count() or 1))
        os.makedirs(args.write_full_size, exist_ok=True)
        model = full_size_round_trip(args.write_full_size)
        write_reference_io(model, args.write_full_size)
        print(f"full-size checkpoint and reference_io.safetensors left in {args.write_full_size}")
        return
    unittest.main(argv=[sys.argv[0]] + rest)


if __name__ == "__main__":
    main()
