"""Writes tests/fixtures/tiny_train.safetensors: loss terms, parameter gradients and a few Adam steps
of the tiny model, for the Rust training-step replay (torch is never needed there).

    python tools/make_train_fixtures.py            # writes tests/fixtures/tiny_train.safetensors
    python tools/make_train_fixtures.py --check    # regenerates in memory, fails if the committed file differs
    python tools/make_train_fixtures.py --list     # prints every tensor of the fixture

Setup: the weights of tests/fixtures/tiny_weights.safetensors, the pixels, prompts and token ids of
tiny_forward.safetensors (tools/make_fixtures.py), two binary masks drawn below, batch 2, dropout OFF
(model.eval(): the loss maths is that of training, but BERT dropout is not replayable), one
Monte-Carlo sample per step whose noise is draw k at step k (philox seed = make_fixtures.SEED),
loss = 0.5 Dice(rows) + 0.5 BCE + 0.1 SoftCon (tau 0.2), torch.optim.Adam(lr 1e-3, betas 0.9/0.999,
eps 1e-8, no weight decay) on the trainable parameters (pvl_adapters, mask_head, upscale).
Deterministic: one CPU thread, deterministic algorithms, the sorted safetensors writer.
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_fixtures  # noqa: E402
from reference import losses  # noqa: E402
from reference.model import Config, MedCLIPSeg, is_trainable  # noqa: E402
from reference.safetensors_io import serialize  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

OUT_NAME = "tiny_train.safetensors"
WEIGHTS_PATH = os.path.join(make_fixtures.OUT_DIR, "tiny_weights.safetensors")
STEPS = 3  # Adam updates; losses are recorded before each and after the last
LEARNING_RATE = 1e-3
BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def make_masks(size):
    """[2, size, size] float32 binary masks with foreground in several rows (and rows without):
    image 0 a disc in the top left (its prompt says so), image 1 an axis-aligned rectangle lower right."""
    r = torch.arange(size, dtype=torch.float32)[:, None]
    c = torch.arange(size, dtype=torch.float32)[None, :]
    disc = ((r - 0.28 * size) ** 2 + (c - 0.28 * size) ** 2 <= (0.19 * size) ** 2).float()
    rect = ((r >= 0.56 * size) & (r < 0.88 * size) & (c >= 0.44 * size) & (c < 0.81 * size)).float()
    return torch.stack([disc, rect])


def load_weights(model):
    from safetensors.torch import load_file
    model.load_state_dict(load_file(WEIGHTS_PATH), strict=True)


def forward_terms(model, pixels, ids, masks, draw):
    """(loss terms dict, acts) of one stochastic forward pass with noise draw `draw`."""
    logits, acts = model(pixels, ids, make_fixtures.SEED, draw)
    patch_tokens = acts["act.vision.tokens"][:, 1:, :]
    terms = losses.all_terms(logits, masks, patch_tokens, acts["act.text.embedding"], losses.TEMPERATURE)
    return terms, acts


def build(cfg, tokenizer):
    return make_fixtures.single_threaded(_build, cfg, tokenizer)


def _build(cfg, tokenizer):
    model = MedCLIPSeg(cfg)
    load_weights(model)
    model.eval()  # dropout OFF; gradients still flow (requires_grad is set on the trainable parts)
    pixels, ids = make_fixtures.make_inputs(cfg, tokenizer)
    masks = make_masks(cfg.image_size)
    trainable = [(name, p) for name, p in model.named_parameters() if is_trainable(name)]
    assert all(p.requires_grad for _, p in trainable)
    optimizer = torch.optim.Adam([p for _, p in trainable], lr=LEARNING_RATE, betas=BETAS, eps=ADAM_EPS)

    out = {"input.pixels": pixels, "input.masks": masks, "input.ids": ids}
    for step in range(STEPS + 1):
        optimizer.zero_grad(set_to_none=True)
        terms, acts = forward_terms(model, pixels, ids, masks, draw=step)
        out[f"loss.step{step}"] = terms["total"].detach().clone()
        if step == STEPS:
            break
        terms["total"].backward()
        if step == 0:
            for name, value in terms.items():
                out[f"loss.{name}"] = value.detach().clone()
            out["act.logits"] = acts["act.logits"].detach().clone()
            out["act.vision.tokens"] = acts["act.vision.tokens"].detach().clone()
            out["act.text.embedding"] = acts["act.text.embedding"].detach().clone()
            for name, p in trainable:
                if p.grad is None:
                    raise RuntimeError(f"{name} received no gradient")
                out[f"grad.{name}"] = p.grad.detach().clone()
        optimizer.step()
    for name, p in trainable:
        out[f"param.step{STEPS}.{name}"] = p.detach().clone()
    out = {k: v.contiguous() for k, v in out.items()}
    metadata = {
        "generator": "tools/make_train_fixtures.py",
        "seed": str(make_fixtures.SEED),
        "draws": "step k uses draw k",
        "prompts": json.dumps(make_fixtures.BATCH_PROMPTS),
        "config": json.dumps(cfg.to_dict(), sort_keys=True),
        "weights": "tests/fixtures/tiny_weights.safetensors",
        "dropout": "off",
        "loss": json.dumps({"dice_rows": losses.DICE_WEIGHT, "bce": losses.CE_WEIGHT, "softcon": losses.CLIP_WEIGHT,
                            "temperature": losses.TEMPERATURE, "dice_smooth": losses.DICE_SMOOTH}, sort_keys=True),
        "adam": json.dumps({"lr": LEARNING_RATE, "beta1": BETAS[0], "beta2": BETAS[1], "eps": ADAM_EPS,
                            "weight_decay": 0.0, "steps": STEPS}, sort_keys=True),
        "torch": torch.__version__.split("+")[0],
    }
    return out, metadata


def serialise(cfg, tokenizer):
    tensors, metadata = build(cfg, tokenizer)
    return serialize(tensors, metadata)


def describe(blob):
    import tempfile
    from safetensors import safe_open
    with tempfile.NamedTemporaryFile(suffix=".safetensors") as f:
        f.write(blob)
        f.flush()
        with safe_open(f.name, "pt") as st:
            for key in sorted(st.keys()):
                t = st.get_tensor(key)
                value = f"  = {t.item():.6f}" if t.numel() == 1 and t.dtype == torch.float32 else ""
                print(f"  {key:72s} {str(t.dtype):14s} {list(t.shape)}{value}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare with the committed file, write nothing")
    parser.add_argument("--list", action="store_true", help="print the tensors of the fixture")
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    cfg = Config.from_json(make_fixtures.CONFIG_PATH)
    tokenizer = Tokenizer.from_file(make_fixtures.TOKENIZER_PATH)
    if tokenizer.get_vocab_size() != cfg.text_vocab_size:
        sys.exit(f"tiny.json text_vocab_size {cfg.text_vocab_size} != tokenizer vocabulary "
                 f"{tokenizer.get_vocab_size()}")
    blob = serialise(cfg, tokenizer)
    if args.list:
        describe(blob)
    path = os.path.join(make_fixtures.OUT_DIR, OUT_NAME)
    if args.check:
        if not os.path.exists(path) or open(path, "rb").read() != blob:
            sys.exit(f"{OUT_NAME} differs from a fresh regeneration")
        print("fixture is up to date")
        return
    with open(path, "wb") as f:
        f.write(blob)
    print(f"wrote tests/fixtures/{OUT_NAME} ({len(blob)} bytes)")


if __name__ == "__main__":
    main()
