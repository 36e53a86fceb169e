"""Writes the CNN-branch parity fixtures replayed by tests/cnn_parity.rs (torch is never needed there).

    python tools/make_cnn_fixtures.py            # writes tests/fixtures/tiny_cnn_{weights,forward}.safetensors
    python tools/make_cnn_fixtures.py --check    # regenerates in memory, fails if a committed file differs

Setup: the tiny model of tools/make_fixtures.py (its weights, pixels, prompts and seed) with the CNN
branch of tools/reference/cnn_branch.py at width BRANCH["width"], fused from vision block 3 of 4
(the default, three quarters of the depth), batch-norm running statistics randomised, dropout 0
(PyTorch's dropout masks cannot be replayed). Files:

  tiny_cnn_weights.safetensors  the branch's parameters and running statistics (`cnn.*`), RANDOM values
  tiny_cnn_forward.safetensors  eval mode, draw 0: the branch's named activations and the fused logits,
                                with the decoder convolutions repeated (the paper code's quirk) and
                                without (`once.act.cnn.fused`); a 3-draw Monte-Carlo prediction; and a
                                training pass (the branch's batch norms on batch statistics, the rest as
                                in eval): loss terms on the fused logits, the gradient of every
                                trainable parameter (official trainable parts and `cnn.`), and the
                                running statistics after the pass.
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_fixtures  # noqa: E402
import make_train_fixtures  # noqa: E402
from reference import losses  # noqa: E402
from reference.cnn_branch import MedCLIPSegWithCnn, is_trainable  # noqa: E402
from reference.model import Config  # noqa: E402
from reference.safetensors_io import serialize  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

BRANCH = {"width": 0.125, "vision_layer": 0, "repeat_decoder_conv": True, "dropout": 0.0, "bn_momentum": 0.1,
          "bn_eps": 1e-5}
SEED = make_fixtures.SEED + 7
MC_SAMPLES = 3


def randomize_branch(model, seed):
    """Random, clearly non-init values for the branch (batch-norm affines around 1 and 0, running
    statistics not 0 and 1), sized so activations stay O(1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in sorted(model.cnn.state_dict().items()):
            if name.endswith("num_batches_tracked"):
                continue
            u = torch.rand(t.shape, generator=gen) * 2 - 1
            module = name.split(".")[0]
            if name.endswith("running_var"):
                value = 1 + 0.5 * u
            elif name.endswith("running_mean"):
                value = 0.3 * u
            elif module.startswith(("bn", "upbn")):
                value = (1 + 0.3 * u) if name.endswith("weight") else 0.2 * u
            elif name.endswith("bias"):
                value = 0.2 * u
            else:
                # Each output of a ConvTranspose2d(stride = kernel) sees one tap of every input
                # channel: its fan-in is dim 0 of its [in, out, 2, 2] weight; other layers' is dim 1 on.
                transposed = module in ("upconv4", "upconv3", "upconv2", "upconv1")
                fan_in = t.shape[0] if transposed else t[0].numel()
                value = u * (3.0 / fan_in) ** 0.5
            t.copy_(value)


def build(cfg, tokenizer):
    return make_fixtures.single_threaded(_build, cfg, tokenizer)


def _build(cfg, tokenizer):
    from safetensors.torch import load_file
    model = MedCLIPSegWithCnn(cfg, BRANCH)
    missing, unexpected = model.load_state_dict(load_file(make_train_fixtures.WEIGHTS_PATH), strict=False)
    assert not unexpected and all(k.startswith("cnn.") for k in missing), (missing, unexpected)
    randomize_branch(model, SEED)
    model.eval()
    pixels, ids = make_fixtures.make_inputs(cfg, tokenizer)
    masks = make_train_fixtures.make_masks(cfg.image_size)
    weights = {f"cnn.{k}": v.detach().clone().contiguous() for k, v in model.cnn.state_dict().items()
               if not k.endswith("num_batches_tracked")}
    out = {"input.pixels": pixels, "input.ids": ids, "input.masks": masks}

    with torch.no_grad():
        fused, acts = model(pixels, ids, make_fixtures.SEED, make_fixtures.DRAW)
        out.update({k: v for k, v in acts.items() if k.startswith("act.cnn.")})
        out["act.logits"] = acts["act.logits"]
        model.cnn.repeat = False
        out["once.act.cnn.fused"] = model(pixels, ids, make_fixtures.SEED, make_fixtures.DRAW)[0]
        model.cnn.repeat = True
        mc_logits, probability, uncertainty = model.predict(pixels, ids, make_fixtures.SEED, MC_SAMPLES)
        out["mc.logits"], out["mc.probability"], out["mc.uncertainty"] = mc_logits, probability, uncertainty

    model.cnn.train()  # batch statistics; dropout is 0
    trainable = [(name, p) for name, p in model.named_parameters() if is_trainable(name)]
    fused, acts = model(pixels, ids, make_fixtures.SEED, make_fixtures.DRAW)
    terms = losses.all_terms(fused, masks, acts["act.vision.tokens"][:, 1:, :], acts["act.text.embedding"],
                             losses.TEMPERATURE)
    terms["total"].backward()
    out["train.act.cnn.fused"] = fused.detach()
    for name, value in terms.items():
        out[f"train.loss.{name}"] = value.detach()
    for name, p in trainable:
        if p.grad is None:
            raise RuntimeError(f"{name} received no gradient")
        out[f"train.grad.{name}"] = p.grad.detach().clone()
    for name, t in model.cnn.state_dict().items():
        if name.endswith(("running_mean", "running_var")):
            out[f"train.running.cnn.{name}"] = t.detach().clone()
    out = {k: v.contiguous() for k, v in out.items()}
    metadata = {
        "generator": "tools/make_cnn_fixtures.py",
        "seed": str(make_fixtures.SEED),
        "draw": str(make_fixtures.DRAW),
        "mc_draws": ",".join(str(n) for n in range(MC_SAMPLES)),
        "branch": json.dumps(BRANCH, sort_keys=True),
        "config": json.dumps(cfg.to_dict(), sort_keys=True),
        "weights": "tests/fixtures/tiny_weights.safetensors + tiny_cnn_weights.safetensors",
        "torch": torch.__version__.split("+")[0],
    }
    return weights, out, metadata


def serialise(cfg, tokenizer):
    weights, forward, metadata = build(cfg, tokenizer)
    meta = {"generator": metadata["generator"], "branch": metadata["branch"]}
    return {
        "tiny_cnn_weights.safetensors": serialize(weights, meta),
        "tiny_cnn_forward.safetensors": serialize(forward, metadata),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare with the committed files, write nothing")
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    cfg = Config.from_json(make_fixtures.CONFIG_PATH)
    tokenizer = Tokenizer.from_file(make_fixtures.TOKENIZER_PATH)
    files = serialise(cfg, tokenizer)
    stale = []
    for name, blob in files.items():
        path = os.path.join(make_fixtures.OUT_DIR, name)
        if args.check:
            if not os.path.exists(path) or open(path, "rb").read() != blob:
                stale.append(name)
            continue
        with open(path, "wb") as f:
            f.write(blob)
        print(f"wrote tests/fixtures/{name} ({len(blob)} bytes)")
    if stale:
        sys.exit(f"fixtures differ from a fresh regeneration: {stale}")
    if args.check:
        print("fixtures are up to date")


if __name__ == "__main__":
    main()
