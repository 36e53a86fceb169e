"""Converts MedCLIPSeg / UniMedCLIP checkpoints and BERT vocabularies into the engine's formats.

model   an official MedCLIPSeg .pth ({"model": state_dict, "epoch", "optimizer", ...} or a bare state
        dict) or a UniMedCLIP .pt (backbone only) -> OUT/model.safetensors + OUT/config.json.
        Every key and shape is checked against the reference model built from --config.
vocab   a BERT/BiomedBERT vocab.txt -> tokenizer.json (BERT uncased WordPiece pipeline, see
        tools/reference/tokenizer.py).
cnn     a checkpoint of VLSM-Ensemble's code holding its UNet-D (bare, or under a prefix such as
        "decoder2." inside the CLIPSeg wrapper) -> its keys added under "cnn." to an engine model
        folder (model.safetensors + config.json), whose config gains the branch (width read from
        conv11, decoder convolutions applied twice as that code does; docs/cnn_branch.md). The
        wrapper's feature-fusion layers (reduce, film_mul, film_add) come along when present and
        fit; otherwise `mcs-engine train` starts them from random weights.

Examples:
  python tools/convert_checkpoint.py model --checkpoint MedCLIPSeg_unimedclip_ViT-B-16_latest.pth --out ckpt/busi
  python tools/convert_checkpoint.py model --checkpoint unimed_clip_vit_b16.pt --out ckpt/unimedclip
  python tools/convert_checkpoint.py vocab --vocab vocab.txt --out ckpt/busi/tokenizer.json
  python tools/convert_checkpoint.py cnn --checkpoint vlsm_ensemble.pth --model-dir ckpt/busi

Assumptions about the inputs (see tools/README.md):
  * a "module." prefix (DataParallel / DDP) on every key is stripped;
  * a dict with "model" (MedCLIPSeg train.py) or "state_dict" (open_clip / UniMedCLIP training) is
    unwrapped; anything else must itself be a state dict;
  * UniMedCLIP / open_clip prefixes are renamed: "visual." -> "vision_model.",
    "text_encoder." (UniMedCLIP's open_clip_lib) or "text." (upstream open_clip HFTextEncoder)
    -> "text_model."; MedCLIPSeg's own keys already use vision_model. / text_model.;
  * buffers the model does not use are dropped with a note: BERT position_ids / token_type_ids and
    an HF BERT pooler (MedCLIPSeg builds BERT without one);
  * floating tensors are stored as float32 (the official model runs in fp32).
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reference.model import TRAINABLE_PARTS, Config, expected_shapes, is_trainable  # noqa: E402
from reference.safetensors_io import save_file  # noqa: E402
from reference.tokenizer import build_tokenizer, read_vocab  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(ROOT, "weights", "configs", "unimedclip-vit-b16.json")

PREFIX_RENAMES = (("visual.", "vision_model."), ("text_encoder.", "text_model."), ("text.", "text_model."))
UNUSED_KEYS = {
    "text_model.transformer.embeddings.position_ids": "HF BERT buffer (positions are 0..L-1)",
    "text_model.transformer.embeddings.token_type_ids": "HF BERT buffer (token type is always 0)",
}
UNUSED_PREFIXES = {
    "text_model.transformer.pooler.": "HF BERT pooler (MedCLIPSeg pools the last [CLS] state itself)",
}


class ConversionError(Exception):
    pass


def load_checkpoint(path, trust_pickle):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises several types for non-tensor pickles
        if not trust_pickle:
            raise ConversionError(
                f"{path}: torch.load(weights_only=True) refused the file ({type(err).__name__}: "
                f"{str(err).splitlines()[0]}). If you trust the file, rerun with --trust-pickle.") from err
    return torch.load(path, map_location="cpu", weights_only=False)


def unwrap_state_dict(obj):
    """The state dict inside an official .pth / open_clip .pt / bare state dict, and where it was."""
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            return obj[key], f'checkpoint["{key}"]'
    if isinstance(obj, dict) and obj and all(torch.is_tensor(v) for v in obj.values()):
        return obj, "bare state dict"
    keys = list(obj)[:10] if isinstance(obj, dict) else type(obj).__name__
    raise ConversionError(f"no state dict found (top-level entries: {keys})")


def normalise_keys(state_dict, notes):
    """Strips "module.", renames open_clip prefixes, drops unused buffers. Returns a new dict."""
    keys = list(state_dict)
    if keys and all(k.startswith("module.") for k in keys):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
        notes.append('stripped the "module." prefix from every key')
    out, renamed = {}, {}
    for key, value in state_dict.items():
        new_key = key
        for old, new in PREFIX_RENAMES:
            if key.startswith(old):
                new_key = new + key[len(old):]
                renamed[old] = new
                break
        if new_key in out:
            raise ConversionError(f"two checkpoint keys map to {new_key}")
        out[new_key] = value
    for old, new in renamed.items():
        notes.append(f'renamed prefix "{old}" -> "{new}"')
    for key in list(out):
        reason = UNUSED_KEYS.get(key) or next((r for p, r in UNUSED_PREFIXES.items() if key.startswith(p)), None)
        if reason:
            del out[key]
            notes.append(f"dropped {key}: {reason}")
    return out


def check_against_config(state_dict, cfg):
    """Raises on any wrong shape, unexpected key or missing frozen key. Returns the missing trainable keys."""
    expected = expected_shapes(cfg)
    problems = []
    for key, shape in expected.items():
        if key in state_dict and tuple(state_dict[key].shape) != shape:
            problems.append(f"{key}: expected shape {list(shape)}, found {list(state_dict[key].shape)}")
    unexpected = sorted(set(state_dict) - set(expected))
    problems += [f"{key}: unexpected key (shape {list(state_dict[key].shape)})" for key in unexpected]
    missing = [k for k in expected if k not in state_dict]
    missing_frozen = [k for k in missing if not is_trainable(k)]
    problems += [f"{key}: missing (expected shape {list(expected[key])})" for key in missing_frozen]
    if problems:
        shown = problems[:40] + ([f"... and {len(problems) - 40} more"] if len(problems) > 40 else [])
        raise ConversionError(f"checkpoint does not match config '{cfg.name}':\n  " + "\n  ".join(shown))
    return [k for k in missing if is_trainable(k)], expected


def summarise_missing(missing, expected):
    groups = {}
    for key in missing:
        group = ".".join(key.split(".")[:2]) if key.startswith("pvl_adapters") else key.split(".")[0]
        n = 1
        for s in expected[key]:
            n *= s
        count, params = groups.get(group, (0, 0))
        groups[group] = (count + 1, params + n)
    return [f"{g}: {c} tensors, {p:,} parameters" for g, (c, p) in groups.items()]


def convert_model(checkpoint, out_dir, config_path, trust_pickle=False, log=print):
    """Converts one checkpoint. Returns (state dict written, list of missing trainable keys)."""
    cfg = Config.from_json(config_path)
    notes = []
    obj = load_checkpoint(checkpoint, trust_pickle)
    state_dict, where = unwrap_state_dict(obj)
    notes.append(f"state dict taken from {where} ({len(state_dict)} entries)")
    state_dict = normalise_keys(state_dict, notes)
    for key, value in state_dict.items():
        if not torch.is_tensor(value):
            raise ConversionError(f"{key}: not a tensor ({type(value).__name__})")
    missing, expected = check_against_config(state_dict, cfg)
    cast = sorted({str(v.dtype) for v in state_dict.values() if v.dtype != torch.float32})
    if cast:
        notes.append(f"cast {', '.join(cast)} tensors to float32")
    tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in state_dict.items()}
    os.makedirs(out_dir, exist_ok=True)
    metadata = {
        "format": "mcs-engine medclipseg",
        "config": cfg.name,
        "source": os.path.basename(checkpoint),
        "complete": "false" if missing else "true",
    }
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata)
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        f.write(cfg.to_json() + "\n")
    for note in notes:
        log(f"note: {note}")
    if missing:
        log(f"backbone-only checkpoint: {len(missing)} trainable tensors are missing and must be "
            f"initialised by the engine:")
        for line in summarise_missing(missing, expected):
            log(f"  {line}")
    n_params = sum(t.numel() for t in tensors.values())
    log(f"wrote {out_dir}/model.safetensors ({len(tensors)} tensors, {n_params:,} parameters) and config.json")
    return tensors, missing


def convert_vocab(vocab_path, out_path, log=print):
    vocab = read_vocab(vocab_path)
    tok = build_tokenizer(vocab)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tok.save(out_path, pretty=True)
    log(f"wrote {out_path} ({len(vocab)} tokens)")
    return tok


# UNet-D modules the paper's code defines but its forward never uses, and the batch-norm step
# counter (unused when momentum is set, as it is).
CNN_UNUSED_MODULES = ("gn1.",)
CNN_FUSION_MODULES = ("reduce", "film_mul", "film_add")


def convert_cnn(checkpoint, model_dir, trust_pickle=False, log=print):
    """Adds a UNet-D (and, when they fit, the fusion layers) to the engine model in `model_dir`.
    Returns the tensors added, by engine key."""
    from safetensors.torch import load_file
    from reference.cnn_branch import MedCLIPSegWithCnn
    notes = []
    state_dict, where = unwrap_state_dict(load_checkpoint(checkpoint, trust_pickle))
    keys = list(state_dict)
    if keys and all(k.startswith("module.") for k in keys):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    anchors = [k for k in state_dict if k.endswith("conv11.weight")]
    if len(anchors) != 1:
        raise ConversionError(f"{checkpoint}: expected one UNet-D (one key ending in conv11.weight), found {anchors}")
    prefix = anchors[0][: -len("conv11.weight")]
    notes.append(f'UNet-D taken from {where}, prefix "{prefix}"')
    added = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix) or key.endswith("num_batches_tracked"):
            continue
        rest = key[len(prefix):]
        if rest.startswith(CNN_UNUSED_MODULES):
            notes.append(f"dropped {key}: defined by the paper's code but unused by its forward")
            continue
        added[f"cnn.{rest}"] = value
    if prefix:
        for module in CNN_FUSION_MODULES:
            for field in ("weight", "bias"):
                if f"{module}.{field}" in state_dict:
                    added[f"cnn.{module}.{field}"] = state_dict[f"{module}.{field}"]
    width = added["cnn.conv11.weight"].shape[0] / 64
    config_path = os.path.join(model_dir, "config.json")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    branch = dict(config.get("cnn_branch") or {})
    branch.update({"width": width, "repeat_decoder_conv": True})
    cfg = Config.from_dict(config)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in MedCLIPSegWithCnn(cfg, branch).state_dict().items()
                    if k.startswith("cnn.") and not k.endswith("num_batches_tracked")}
    problems = [f"{k}: expected shape {list(expected[k])}, found {list(v.shape)}"
                for k, v in added.items() if k in expected and tuple(v.shape) != expected[k]]
    fusion_problems = [p for p in problems if p.split(":")[0].split(".")[1] in CNN_FUSION_MODULES]
    if fusion_problems:
        for key in [k for k in added if k.split(".")[1] in CNN_FUSION_MODULES]:
            del added[key]
        notes.append("the checkpoint's fusion layers do not fit this model (" + "; ".join(fusion_problems) +
                     "): left out, `mcs-engine train` starts them from random weights")
        problems = [p for p in problems if p not in fusion_problems]
    problems += [f"{k}: unexpected key" for k in sorted(set(added) - set(expected))]
    missing = sorted(k for k in set(expected) - set(added) if k.split(".")[1] not in CNN_FUSION_MODULES)
    problems += [f"{k}: missing" for k in missing]
    if problems:
        raise ConversionError(f"{checkpoint}: not a UNet-D of width {width}:\n  " + "\n  ".join(problems[:40]))
    model_path = os.path.join(model_dir, "model.safetensors")
    tensors = load_file(model_path)
    tensors.update({k: v.detach().to(torch.float32).contiguous() for k, v in added.items()})
    save_file(tensors, model_path, {"format": "mcs-engine medclipseg", "config": cfg.name,
                                    "source": os.path.basename(checkpoint), "cnn_branch": "true"})
    config["cnn_branch"] = branch
    trainable = list(config.get("trainable", TRAINABLE_PARTS))
    if "cnn." not in trainable:
        config["trainable"] = trainable + ["cnn."]
    with open(config_path, "w", encoding="utf-8") as f:
        f.write(json.dumps(config, indent=2) + "\n")
    for note in notes:
        log(f"note: {note}")
    log(f"added {len(added)} CNN-branch tensors (width {width}) to {model_path}; config.json gains cnn_branch")
    return added


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("model", help="MedCLIPSeg .pth / UniMedCLIP .pt -> model.safetensors + config.json")
    m.add_argument("--checkpoint", required=True, help="input .pth / .pt")
    m.add_argument("--out", required=True, help="output folder")
    m.add_argument("--config", default=DEFAULT_CONFIG, help="model config JSON (default: %(default)s)")
    m.add_argument("--trust-pickle", action="store_true",
                   help="allow full unpickling when torch.load(weights_only=True) refuses the file")
    v = sub.add_parser("vocab", help="BERT vocab.txt -> tokenizer.json")
    v.add_argument("--vocab", required=True, help="input vocab.txt (one token per line, id = line number)")
    v.add_argument("--out", required=True, help="output tokenizer.json")
    c = sub.add_parser("cnn", help="VLSM-Ensemble UNet-D -> added to an engine model folder under cnn.")
    c.add_argument("--checkpoint", required=True, help="input .pth / .pt holding the UNet-D")
    c.add_argument("--model-dir", required=True, help="engine model folder (model.safetensors + config.json)")
    c.add_argument("--trust-pickle", action="store_true",
                   help="allow full unpickling when torch.load(weights_only=True) refuses the file")
    args = parser.parse_args(argv)
    try:
        if args.command == "model":
            convert_model(args.checkpoint, args.out, args.config, args.trust_pickle)
        elif args.command == "cnn":
            convert_cnn(args.checkpoint, args.model_dir, args.trust_pickle)
        else:
            convert_vocab(args.vocab, args.out)
    except (ConversionError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
