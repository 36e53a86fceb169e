"""Writes the tiny-config parity fixtures replayed by the Rust tests (torch is never needed there).

    python tools/make_fixtures.py            # writes tests/fixtures/tiny_*.{safetensors,json}
    python tools/make_fixtures.py --check    # regenerates in memory, fails if a committed file differs

Deterministic: weights come from torch.manual_seed(SEED), noise from the shared Philox generator with
the same seed, one CPU thread, a sorted safetensors writer: rerunning produces byte-identical files
(same torch version and CPU family; another CPU's kernels may change the last bits of activations).

Files:
  tiny_weights.safetensors  every official state-dict key of the tiny model, float32, RANDOM values
                            (not the init: LayerNorm weights in [0.5, 1.5], gates in [-1, 1], ...)
  tiny_forward.safetensors  inputs, named activations of one forward pass (draw DRAW), the noise it
                            used, and a 3-draw Monte-Carlo prediction; metadata: seed, draw, config
  tiny_tokens.json          tokenizer parity cases (HF tokenizers, padding/truncation at length 16)
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference.model import Config, MedCLIPSeg  # noqa: E402
from reference.safetensors_io import serialize  # noqa: E402
from reference.tokenizer import encode_padded  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_PATH = os.path.join(ROOT, "weights", "configs", "tiny.json")
TOKENIZER_PATH = os.path.join(ROOT, "weights", "tiny", "tokenizer.json")
OUT_DIR = os.path.join(ROOT, "tests", "fixtures")

SEED = 20261123
DRAW = 0  # draw index of the single forward pass; the MC prediction uses draws 0..MC_SAMPLES-1
MC_SAMPLES = 3
BATCH_PROMPTS = [
    "a small red circle in the top left of the image.",
    "No lesion in the image",
]
TOKEN_CASES = [
    "a small red circle in the top left of the image.",
    "No lesion in the image",
    "Two LARGE blue squares, located at the bottom right.",
    "One medium yellow polyp - visible in the center of the image.",
    "a zebra-shaped tumor in the upper middle",  # unknown word -> [UNK]; '-' is punctuation
    "Circl\u00e9 blobs at the lower left",  # accent stripped -> circle; blobs -> blob ##s
    "  three   small\tlesions\n",  # whitespace of every kind
    "reddish largeish tumors",  # no ##dish piece -> whole word [UNK]; large ##ish; tumor ##s
    "one small red circle and two large blue squares and three pink triangles in the upper left region",
    "",
]


def is_layernorm_weight(name):
    return name.endswith(".weight") and any(
        part in name for part in ("LayerNorm", "ln_", "norm_k", "norm_v", ".norm."))


def is_layernorm_bias(name):
    return name.endswith(".bias") and any(part in name for part in ("LayerNorm", "ln_", "norm_k", "norm_v", ".norm."))


def fan_in(name, shape):
    if name.endswith("vision_model.proj"):  # used as x @ proj, shape [in, out]
        return shape[0]
    if ".conv1.weight" in name and name.startswith("upscale"):  # ConvTranspose2d weight [in, out, kh, kw]
        return shape[0]
    n = 1
    for s in shape[1:]:
        n *= s
    return n


def randomize(model, seed):
    """Random, clearly non-init values for every parameter, sized so activations stay O(1) and softmaxes
    are neither uniform nor one-hot (uniform(-1, 1) matrices would saturate every attention)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            u = torch.rand(p.shape) * 2 - 1  # uniform(-1, 1)
            if is_layernorm_weight(name):
                value = 1 + 0.5 * u
            elif is_layernorm_bias(name):
                value = 0.5 * u
            elif name.endswith("bias"):
                value = 0.2 * u
            elif p.dim() <= 1 or "embedding" in name:  # gates, logit_scale, class/positional/word embeddings
                value = u
            else:  # matrices and conv kernels: variance 2 / fan_in
                value = u * (6.0 / fan_in(name, p.shape)) ** 0.5
            p.copy_(value)


def make_inputs(cfg, tokenizer):
    gen = torch.Generator().manual_seed(SEED + 1)
    pixels = torch.randn(len(BATCH_PROMPTS), 3, cfg.image_size, cfg.image_size, generator=gen)
    ids = torch.tensor(encode_padded(tokenizer, BATCH_PROMPTS, cfg.text_context_length, cfg.text_pad_id),
                       dtype=torch.int64)
    return pixels, ids


def single_threaded(fn, *args):
    """fn(*args) on one torch thread: one reduction order whatever the machine's core count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(threads)


def build(cfg, tokenizer):
    """(weights dict, forward dict, metadata, token cases) — everything the fixtures hold."""
    return single_threaded(_build, cfg, tokenizer)


def _build(cfg, tokenizer):
    model = MedCLIPSeg(cfg)
    randomize(model, SEED)
    model.eval()
    pixels, ids = make_inputs(cfg, tokenizer)
    with torch.no_grad():
        logits, acts = model(pixels, ids, SEED, DRAW)
        mc_logits, probability, uncertainty = model.predict(pixels, ids, SEED, MC_SAMPLES)
    assert torch.equal(mc_logits[DRAW], logits), "draw DRAW of predict must equal the forward pass"
    weights = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    forward = {"input.pixels": pixels, "input.ids": ids}
    forward.update({k: v.detach().contiguous() for k, v in acts.items()})
    forward["mc.logits"] = mc_logits
    forward["mc.probability"] = probability
    forward["mc.uncertainty"] = uncertainty
    metadata = {
        "seed": str(SEED),
        "draw": str(DRAW),
        "mc_draws": ",".join(str(n) for n in range(MC_SAMPLES)),
        "prompts": json.dumps(BATCH_PROMPTS),
        "config": json.dumps(cfg.to_dict(), sort_keys=True),
        "generator": "tools/make_fixtures.py",
    }
    cases = [{"text": text, "ids": enc_ids, "tokens": [tokenizer.id_to_token(i) for i in enc_ids]}
             for text, enc_ids in zip(TOKEN_CASES, encode_padded(tokenizer, TOKEN_CASES, cfg.text_context_length,
                                                                  cfg.text_pad_id))]
    return weights, forward, metadata, cases


def serialise(cfg, tokenizer):
    """file name -> bytes."""
    weights, forward, metadata, cases = build(cfg, tokenizer)
    weights_meta = {"seed": metadata["seed"], "config": metadata["config"], "generator": metadata["generator"]}
    return {
        "tiny_weights.safetensors": serialize(weights, weights_meta),
        "tiny_forward.safetensors": serialize(forward, metadata),
        "tiny_tokens.json": (json.dumps(cases, indent=1, ensure_ascii=True) + "\n").encode("utf-8"),
    }


def describe(files):
    from safetensors import safe_open
    import tempfile
    for name, blob in files.items():
        print(f"{name}: {len(blob)} bytes")
        if name.endswith(".safetensors") and "forward" in name:
            with tempfile.NamedTemporaryFile(suffix=".safetensors") as f:
                f.write(blob)
                f.flush()
                with safe_open(f.name, "pt") as st:
                    for key in sorted(st.keys()):
                        t = st.get_tensor(key)
                        print(f"  {key:44s} {str(t.dtype):14s} {list(t.shape)}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare with the committed files, write nothing")
    parser.add_argument("--list", action="store_true", help="print the tensors of the forward fixture")
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    cfg = Config.from_json(CONFIG_PATH)
    tokenizer = Tokenizer.from_file(TOKENIZER_PATH)
    if tokenizer.get_vocab_size() != cfg.text_vocab_size:
        sys.exit(f"tiny.json text_vocab_size {cfg.text_vocab_size} != tokenizer vocabulary "
                 f"{tokenizer.get_vocab_size()}")
    files = serialise(cfg, tokenizer)
    if args.list:
        describe(files)
    if args.check:
        stale = []
        for name, blob in files.items():
            path = os.path.join(OUT_DIR, name)
            if not os.path.exists(path) or open(path, "rb").read() != blob:
                stale.append(name)
        if stale:
            sys.exit(f"fixtures differ from a fresh regeneration: {stale}")
        print("fixtures are up to date")
        return
    os.makedirs(OUT_DIR, exist_ok=True)
    for name, blob in files.items():
        with open(os.path.join(OUT_DIR, name), "wb") as f:
            f.write(blob)
        print(f"wrote tests/fixtures/{name} ({len(blob)} bytes)")


if __name__ == "__main__":
    main()
