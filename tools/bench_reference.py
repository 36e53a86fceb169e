"""Side-by-side timings of the engine and the PyTorch reference (tools/reference/) on the same
config, batch, thread count and precision, run alternately (engine, torch, engine, torch, ...)
in one invocation so that the machine's noise hits both sides alike.

    python tools/bench_reference.py train [--config small] [--batch 16] [--threads 2]
                                          [--steps 10] [--warmup 2] [--rounds 3] [--engine PATH]

`train`: one optimisation step (forward with one Monte-Carlo sample, 0.5 Dice(rows) + 0.5 BCE +
0.1 SoftCon, backward, Adam) with random weights, on a batch of the engine's synthetic task
(`mcs-engine synth` writes the same images). The torch side is the plain reference model in FP32
eager mode; its V noise comes from torch.randn (as in the official code) rather than the NumPy
Philox used for parity, so the reference is not slowed by NumPy. Dropout follows the config's
recipe (off for `small`). Prints each side's median step time and images/s with their spread over
the rounds, and the ratio.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from reference import losses, model as ref  # noqa: E402


def engine_round(args):
    cmd = [args.engine, "bench", "train", "--config", args.config, "--batch-size", str(args.batch),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
           "--device", "cpu", "--json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["median_s"]


def synthetic_batch(cfg, batch, engine):
    """The engine's synthetic batch (via `mcs-engine synth`), read back as tensors."""
    import numpy as np
    from PIL import Image

    folder = os.path.join("/tmp", f"mcs-bench-synth-{os.getpid()}")
    subprocess.run([engine, "synth", "--out", folder, "--size", str(cfg.image_size), "--train", str(batch),
                    "--val", "1", "--test", "1"], check=True, capture_output=True)
    img_dir = os.path.join(folder, "Train_Folder", "img")
    names = sorted(os.listdir(img_dir))[:batch]
    mean = np.array([0.485, 0.456, 0.406], dtype=np.float32)[:, None, None]
    std = np.array([0.229, 0.224, 0.225], dtype=np.float32)[:, None, None]
    pixels, masks = [], []
    for name in names:
        grey = np.asarray(Image.open(os.path.join(img_dir, name)).convert("L"), dtype=np.float32) / 255.0
        pixels.append((np.stack([grey] * 3) - mean) / std)
        mask = np.asarray(Image.open(os.path.join(folder, "Train_Folder", "label", name)).convert("L"))
        masks.append((mask >= 127).astype(np.float32))
    return torch.from_numpy(np.stack(pixels)), torch.from_numpy(np.stack(masks))


def torch_setup(args):
    with open(os.path.join(ROOT, "weights", "configs", f"{args.config}.json")) as f:
        raw = json.load(f)
    cfg = ref.Config.from_dict(raw)
    trainable_parts = raw.get("trainable", list(ref.TRAINABLE_PARTS))
    recipe = raw.get("training", {})
    torch.manual_seed(0)
    model = ref.MedCLIPSeg(cfg)
    params = []
    for name, p in model.named_parameters():
        train = any(part in name for part in trainable_parts) and name != "logit_scale"
        p.requires_grad_(train)
        if train:
            params.append(p)
    model.train(recipe.get("text_dropout", 0.1) > 0)
    optimizer = torch.optim.Adam(params, lr=1e-4)
    pixels, masks = synthetic_batch(cfg, args.batch, args.engine)
    ids = torch.randint(1, cfg.text_vocab_size, (args.batch, cfg.text_context_length))
    ids[:, 14:] = cfg.text_pad_id
    return model, optimizer, pixels, ids, masks


def torch_round(state, args):
    model, optimizer, pixels, ids, masks = state
    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        logits, acts = model(pixels, ids, 0, step)
        terms = losses.all_terms(logits, masks, acts["act.vision.tokens"][:, 1:, :], acts["act.text.embedding"])
        terms["total"].backward()
        optimizer.step()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("case", choices=["train"])
    parser.add_argument("--config", default="small")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--engine", default=os.path.join(ROOT, "target", "release", "mcs-engine"))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    # The V noise of the official code: torch.randn, not the NumPy Philox of the parity fixtures.
    ref.adapter_noise = lambda seed, draw, adapter, direction, shape, device=None: torch.randn(shape)
    state = torch_setup(args)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"float32 matmul precision '{torch.get_float32_matmul_precision()}'; engine {args.engine}")
    engine_s, torch_s = [], []
    for r in range(args.rounds):
        engine_s.append(engine_round(args))
        torch_s.append(torch_round(state, args))
        print(f"round {r + 1}: engine {engine_s[-1] * 1e3:.1f} ms/step, torch {torch_s[-1] * 1e3:.1f} ms/step")

    def summary(name, times):
        med = statistics.median(times)
        return med, f"{name:>7}: {med * 1e3:8.1f} ms/step ({min(times) * 1e3:.1f}-{max(times) * 1e3:.1f}), " \
                    f"{args.batch / med:6.1f} images/s"

    e_med, e_line = summary("engine", engine_s)
    t_med, t_line = summary("torch", torch_s)
    print(f"\ntrain step, config {args.config}, batch {args.batch}, {args.threads} threads, FP32, "
          f"{args.rounds} rounds x {args.steps} steps (median per round; range over rounds)")
    print(e_line)
    print(t_line)
    print(f"  ratio: the engine trains {t_med / e_med:.2f}x as many images/s as PyTorch")


if __name__ == "__main__":
    main()
