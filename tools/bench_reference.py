"""Side-by-side timings of the engine and the PyTorch reference (tools/reference/) on the same
config, shapes, thread count and FP32 precision, run alternately (engine, torch, engine, torch, ...)
in one invocation so that the machine's noise hits both sides alike.

    python tools/bench_reference.py CASE [--config small|tiny|paper|PATH] [--batch N] [--samples 30]
                                         [--threads 2] [--steps S] [--warmup W] [--rounds 3] [--engine PATH]

Cases (random weights; the engine side is `mcs-engine bench CASE --json`):

`train`: one optimisation step (forward with one Monte-Carlo sample, 0.5 Dice(rows) + 0.5 BCE +
  0.1 SoftCon, backward, Adam) on a batch of the engine's synthetic task (`mcs-engine synth` writes
  the same images). Dropout follows the config's recipe (off for `small`). Default batch 16.
`predict`: `--samples` Monte-Carlo draws for a batch (default 1), to the mean probability and its
  entropy, under torch.no_grad(). Two torch variants: `loop`, the official order (one whole forward
  per sample, `reference.model.MedCLIPSeg.predict`), and `batched`, the engine's order (the part
  before the first adapter once, then the samples stacked in the batch dimension; written here
  from the reference's own modules, `batched_predict`).
`forward`: one inference forward pass with one sample (one iteration of the official loop).
`attention`: the probabilistic attention alone at the config's adapter shapes, image->text
  (queries the 1 + grid^2 image tokens, keys the text context) and text->image, `--samples` draws
  stacked in the batch: PyTorch's unfused composition of the reference's maths (q k^T, the sigma
  term, softmax, sampled V, A V; `prob_attention` below) against the engine's fused op, forward
  under no_grad and forward + autograd backward to all five inputs.

`saliency`: MedCLIP-SAMv2's M2IB bottleneck for one image, as its official pipeline runs it: 10 Adam
  steps (lr 1) on alpha [T, W], each a forward and backward pass of 10 noise copies through the vision
  tower from block L on (L = round(7/12 depth)), objective beta * mean KL - cos(image, text); the
  engine side is `mcs-engine bench saliency` (`saliency::optimise_bottleneck`), the torch side the
  same maths on the reference's modules with autograd (`m2ib_bottleneck` below).
`cnn-ops`: the ops of VLSM-Ensemble's CNN branch (UNet-D) at its paper-size shapes, batch 2 at 224
  px: the engine side is `cargo bench --bench ops -- cnn --json` (NHWC, im2col + GEMM), the torch
  side the same ops through torch.nn.functional on NCHW tensors (PyTorch's own layout and its
  oneDNN convolutions), forward, plus forward+backward for the first convolution and batch norm.
  Each side's median of 3 repeats per round; `--batch`, `--config`, `--samples` do not apply.

Both sides draw the V noise at run time (torch.randn, as the official code; the engine's Philox in
its kernels), not the NumPy Philox of the parity fixtures, so the reference is not slowed by NumPy.
Every torch round runs in its own child process (`--worker`), so its peak resident set
(ru_maxrss) belongs to that case alone, as the engine's VmHWM does. Prints each side's median
with its range over all timed steps of all rounds, images/s, peak RSS, and the ratios.
"""

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from reference import losses, model as ref  # noqa: E402

ALIASES = {"paper": "unimedclip-vit-b16"}
# Defaults per case: a paper-size predict step at 30 samples takes tens of seconds on a 2-core CPU.
DEFAULTS = {"train": (16, 10, 2), "predict": (1, 1, 1), "forward": (1, 5, 1), "attention": (1, 5, 1),
            "cnn-ops": (2, 3, 1), "saliency": (1, 3, 1)}  # batch, steps, warmup
TORCH_VARIANTS = {"train": ["train"], "predict": ["loop", "batched"], "forward": ["forward"],
                  "attention": ["attention"], "cnn-ops": ["cnn"], "saliency": ["saliency"]}


# ---------------------------------------------------------------------------------------------------
# What the torch side computes


def load_config(spec):
    path = spec if os.path.isfile(spec) else os.path.join(ROOT, "weights", "configs",
                                                          f"{ALIASES.get(spec, spec)}.json")
    if not os.path.isfile(path):
        raise SystemExit(f"unknown config `{spec}`: neither a file nor weights/configs/{spec}.json")
    with open(path) as f:
        raw = json.load(f)
    return raw, ref.Config.from_dict(raw)


def prompt_ids(cfg, batch):
    """14 random token ids per prompt, then padding (the engine's layout for a config without a
    shipped tokenizer; the text tower attends over the whole padded context either way)."""
    ids = torch.randint(1, cfg.text_vocab_size, (batch, cfg.text_context_length))
    ids[:, 14:] = cfg.text_pad_id
    return ids


def randn_noise(k, direction, shape):
    """Stacked V noise of adapter k for all samples at once (one torch.randn per attention)."""
    return torch.randn(shape)


def batched_predict(model, pixels, ids, samples, noise=randn_noise):
    """The engine's order of Monte-Carlo inference on the reference's modules: embeddings and the
    blocks before the first adapter once, then image tokens, text tokens and the text mask
    repeated `samples` times sample-major (row s*B + b is sample s of image b) and every later
    layer run once on the stacked batch. `noise(k, direction, (S*B, T, C))` gives adapter k's
    noise; with per-draw Philox noise this equals `model.predict` (tools/tests/test_bench_reference.py).
    Returns (logits [S, B, H, W], mean probability, entropy) as `MedCLIPSeg.predict` does."""
    cfg = model.cfg
    vision, bert = model.vision_model, model.text_model.transformer
    b = pixels.shape[0]
    mask = model.text_model.additive_mask(ids)
    x_img, x_txt = vision.embed(pixels), bert.embeddings(ids)
    stacked = samples == 1

    def stack():
        return x_img.repeat(samples, 1, 1), x_txt.repeat(samples, 1, 1), mask.repeat(samples, 1, 1, 1)

    for i, (block, layer) in enumerate(zip(vision.transformer.resblocks, bert.encoder.layer)):
        if i in cfg.adapter_layers:
            if not stacked:
                x_img, x_txt, mask = stack()
                stacked = True
            k, c = cfg.adapter_layers.index(i), cfg.adapter_dim
            n_i2t = noise(k, 0, (samples * b, x_txt.shape[1], c))
            n_t2i = noise(k, 1, (samples * b, x_img.shape[1], c))
            dv, dt, _, _ = model.pvl_adapters[k](x_img, x_txt, n_i2t, n_t2i)
            x_img, x_txt = x_img + dv, x_txt + dt
        x_img = block(x_img)
        x_txt = layer(x_txt, mask)
    if not stacked:
        x_img, x_txt, mask = stack()
    logits = model.segment(vision.output_tokens(x_img), model.text_model.pooled_embedding(x_txt))
    logits = logits.reshape(samples, b, *logits.shape[1:])
    p = torch.sigmoid(logits).mean(dim=0)
    entropy = -(p * torch.log(p + ref.ENTROPY_EPS) + (1 - p) * torch.log(1 - p + ref.ENTROPY_EPS))
    return logits, p, entropy


def prob_attention(q, k_mu, k_var, v_mu, v_var, beta, noise):
    """The probabilistic attention of `reference.model.ProbCrossAttention.forward` between its
    projections and out_proj, op for op (unfused: every intermediate is materialised)."""
    c = q.shape[-1]
    s_mu = (q @ k_mu.transpose(1, 2)) / math.sqrt(c)
    s_sigma = torch.sqrt((q * q) @ k_var.transpose(1, 2) / c)
    attn = torch.softmax(s_mu - beta * s_sigma, dim=-1)
    v_sample = v_mu + torch.sqrt(v_var) * noise
    return attn @ v_sample


# ---------------------------------------------------------------------------------------------------
# Workers: one torch case in its own process, one JSON line on stdout


def timed(warmup, steps, step):
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        step(i)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


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


def worker_train(args, raw, cfg):
    trainable_parts = raw.get("trainable", list(ref.TRAINABLE_PARTS))
    recipe = raw.get("training", {})
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
    ids = prompt_ids(cfg, args.batch)

    def step(i):
        optimizer.zero_grad(set_to_none=True)
        logits, acts = model(pixels, ids, 0, i)
        terms = losses.all_terms(logits, masks, acts["act.vision.tokens"][:, 1:, :], acts["act.text.embedding"])
        terms["total"].backward()
        optimizer.step()

    return {"times_s": timed(args.warmup, args.steps, step)}


def inference_inputs(args, cfg):
    model = ref.MedCLIPSeg(cfg).eval()
    pixels = torch.randn(args.batch, 3, cfg.image_size, cfg.image_size)
    return model, pixels, prompt_ids(cfg, args.batch)


def worker_inference(args, raw, cfg):
    model, pixels, ids = inference_inputs(args, cfg)
    if args.worker == "loop":
        def step(i):
            model.predict(pixels, ids, 0, args.samples)
    elif args.worker == "batched":
        def step(i):
            batched_predict(model, pixels, ids, args.samples)
    else:  # forward: one iteration of the official loop
        def step(i):
            model.segment(*model.encode(pixels, ids, 0, 0))
    with torch.no_grad():
        return {"times_s": timed(args.warmup, args.steps, step)}


def worker_attention(args, raw, cfg):
    rows, c = args.samples * args.batch, cfg.adapter_dim
    directions = []
    for name, tq, tk in (("image_to_text", cfg.vision_tokens, cfg.text_context_length),
                         ("text_to_image", cfg.text_context_length, cfg.vision_tokens)):
        q = torch.randn(rows, tq, c)
        k_mu, v_mu = torch.randn(rows, tk, c), torch.randn(rows, tk, c)
        k_var, v_var = (F.softplus(torch.randn(rows, tk, c)) + ref.VARIANCE_EPS for _ in range(2))
        d_out = torch.randn(rows, tq, c)
        inputs = [q, k_mu, k_var, v_mu, v_var]

        def forward(i):
            with torch.no_grad():
                prob_attention(*inputs, cfg.beta, torch.randn(rows, tk, c))

        leaves = [t.clone().requires_grad_(True) for t in inputs]

        def forward_backward(i):
            for t in leaves:
                t.grad = None
            out = prob_attention(*leaves, cfg.beta, torch.randn(rows, tk, c))
            out.backward(d_out)

        directions.append({"direction": name, "q_shape": [rows, tq, c], "kv_shape": [rows, tk, c],
                           "forward_times_s": timed(args.warmup, args.steps, forward),
                           "forward_backward_times_s": timed(args.warmup, args.steps, forward_backward)})
    return {"directions": directions}


def eca(x, weight):
    gate = torch.sigmoid(F.conv1d(x.mean(dim=(2, 3)).unsqueeze(1), weight, padding=weight.shape[-1] // 2))
    return x * gate.squeeze(1)[:, :, None, None]


def cnn_op_cases():
    """(engine label, callable) of the CNN branch's ops at the shapes of benches/ops.rs, NCHW."""
    b, cases = 2, []
    for label, side, cin, cout, k in (("conv3x3 2x224x224 64 -> 64", 224, 64, 64, 3),
                                      ("conv3x3 2x56x56 256 -> 256", 56, 256, 256, 3),
                                      ("conv3x3 2x28x28 546 -> 546", 28, 546, 546, 3),
                                      ("conv1x1 2x14x14 640 -> 1240", 14, 640, 1240, 1)):
        x, w, bias = torch.randn(b, cin, side, side), torch.randn(cout, cin, k, k), torch.randn(cout)
        cases.append((label, lambda x=x, w=w, bias=bias, k=k: F.conv2d(x, w, bias, padding=k // 2)))
    x, w, bias = torch.randn(b, 1240, 14, 14), torch.randn(1240, 546, 2, 2), torch.randn(546)
    cases.append(("conv_transpose2x2 2x14x14 1240 -> 546",
                  lambda x=x, w=w, bias=bias: F.conv_transpose2d(x, w, bias, stride=2)))
    leaves = [torch.randn(b, 64, 224, 224, requires_grad=True), torch.randn(64, 64, 3, 3, requires_grad=True),
              torch.randn(64, requires_grad=True)]
    dy = torch.randn(b, 64, 224, 224)

    def conv_backward():
        for t in leaves:
            t.grad = None
        F.conv2d(leaves[0], leaves[1], leaves[2], padding=1).backward(dy)

    cases.append(("conv3x3 2x224x224 64 -> 64 forward+backward", conv_backward))
    x = torch.randn(b, 64, 224, 224)
    w, bias = torch.ones(64), torch.zeros(64)
    cases.append(("batch_norm_train 2x224x224x64",
                  lambda: F.batch_norm(x, torch.zeros(64), torch.ones(64), w, bias, training=True, momentum=0.1)))
    bn_leaves = [x.clone().requires_grad_(True), w.clone().requires_grad_(True), bias.clone().requires_grad_(True)]

    def bn_backward():
        for t in bn_leaves:
            t.grad = None
        F.batch_norm(bn_leaves[0], None, None, bn_leaves[1], bn_leaves[2], training=True).backward(dy)

    cases.append(("batch_norm_train fwd+bwd 2x224x224x64", bn_backward))
    cases.append(("max_pool2x2 2x224x224x64", lambda: F.max_pool2d(x, 2)))
    bottleneck, eca_w = torch.randn(b, 1240, 14, 14), torch.randn(1, 1, 5)
    cases.append(("eca 2x14x14x1240 k=5", lambda: eca(bottleneck, eca_w)))
    cases.append(("relu 2x224x224x64", lambda: F.relu(x)))
    return cases


def worker_cnn_ops(args, raw, cfg):
    out = []
    for label, run in cnn_op_cases():
        def step(i, run=run):
            with torch.enable_grad():
                run()
        times = timed(args.warmup, args.steps, step)
        out.append({"name": label, "median_ms": statistics.median(times) * 1e3})
    return {"cases": out}


def m2ib_bottleneck(model, pixels, ids, layer, steps=10, copies=10, beta=0.1, lr=1.0):
    """The bottleneck's optimisation for one image (see the module docs), the towers frozen."""
    vision, bert = model.vision_model, model.text_model.transformer
    with torch.no_grad():
        x = vision.embed(pixels)
        for block in vision.transformer.resblocks[:layer]:
            x = block(x)
        mask = model.text_model.additive_mask(ids)
        t = bert.embeddings(ids)
        for bert_layer in bert.encoder.layer:
            t = bert_layer(t, mask)
        text = model.text_model.pooled_embedding(t)
    alpha = torch.full(x.shape[1:], 5.0, requires_grad=True)
    optimiser = torch.optim.Adam([alpha], lr=lr)
    for _ in range(steps):
        optimiser.zero_grad()
        lam = torch.sigmoid(alpha)
        mu, sigma = lam * x, 1 - lam
        z = mu + sigma * torch.randn(copies, *x.shape[1:])
        for block in vision.transformer.resblocks[layer:]:
            z = block(z)
        image = vision.output_tokens(z)[:, 0]
        kl = 0.5 * (mu ** 2 + sigma ** 2 - 1 - torch.log(sigma ** 2))
        loss = beta * kl.mean() - F.cosine_similarity(image, text.expand_as(image), dim=-1).mean()
        loss.backward()
        optimiser.step()
    return alpha.detach()


def worker_saliency(args, raw, cfg):
    model = ref.MedCLIPSeg(cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    pixels = torch.randn(1, 3, cfg.image_size, cfg.image_size)
    ids = prompt_ids(cfg, 1)
    layer = (7 * cfg.vision_layers + 6) // 12
    return {"times_s": timed(args.warmup, args.steps, lambda i: m2ib_bottleneck(model, pixels, ids, layer))}


def worker(args):
    torch.set_num_threads(args.threads)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    ref.adapter_noise = lambda seed, draw, adapter, direction, shape, device=None: torch.randn(shape)
    raw, cfg = load_config(args.config)
    run = {"train": worker_train, "attention": worker_attention, "cnn": worker_cnn_ops,
           "saliency": worker_saliency}.get(args.worker, worker_inference)
    report = run(args, raw, cfg)
    # ru_maxrss is in KiB on Linux.
    report.update(torch=torch.__version__, threads=torch.get_num_threads(),
                  matmul_precision=torch.get_float32_matmul_precision(),
                  peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(report))


# ---------------------------------------------------------------------------------------------------
# The driver: alternate the sides round by round and summarise


def child_json(cmd, env=None):
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr.strip()}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def engine_report(args):
    if args.case == "cnn-ops":
        env = dict(os.environ, RAYON_NUM_THREADS=str(args.threads))
        report = child_json(["cargo", "bench", "--quiet", "--bench", "ops", "--", "cnn", "--json"], env)
        report["cases"] = [c for c in report["cases"] if c["device"] == "cpu"]
        report["peak_rss_mib"] = None
        return report
    cmd = [args.engine, "bench", args.case, "--config", args.config, "--batch-size", str(args.batch),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
           "--device", "cpu", "--json"]
    if args.case == "predict" and args.engine_fast:
        cmd += ["--fast"]
    elif args.case in ("predict", "attention"):
        cmd += ["--samples", str(args.samples)]
    return child_json(cmd)


def torch_report(args, variant):
    cmd = [sys.executable, os.path.abspath(__file__), args.case, "--worker", variant]
    for flag in ("config", "batch", "samples", "threads", "steps", "warmup", "engine"):
        cmd += [f"--{flag}", str(getattr(args, flag))]
    return child_json(cmd)


def series(report):
    """{label: [seconds per timed step]} of one report, engine or torch."""
    if "cases" in report:  # cnn-ops: one median per op and round
        return {c["name"]: [c["median_ms"] / 1e3] for c in report["cases"]}
    if "directions" in report:
        out = {}
        for d in report["directions"]:
            for part in ("forward", "forward_backward"):
                out[f"{d['direction']} {part}"] = d[f"{part}_times_s"]
        return out
    return {"step": report["times_s"]}


def describe(times, batch=None):
    med = statistics.median(times)
    line = f"{med * 1e3:.1f} ms ({min(times) * 1e3:.1f}-{max(times) * 1e3:.1f})"
    return med, line + (f", {batch / med:7.3g} images/s" if batch else "")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("case", choices=sorted(DEFAULTS))
    parser.add_argument("--config", default="small", help="tiny, small, paper or a config.json path")
    parser.add_argument("--batch", type=int, help="images per step (default: 16 for train, else 1)")
    parser.add_argument("--samples", type=int, default=30, help="Monte-Carlo samples (predict, attention)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, help="timed steps per round (default: 10 train, 1 predict, 5 others)")
    parser.add_argument("--warmup", type=int, help="untimed steps per round (default: 2 train, else 1)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--engine", default=os.path.join(ROOT, "target", "release", "mcs-engine"))
    parser.add_argument("--engine-fast", action="store_true",
                        help="predict: the engine runs `predict --fast` (its quality-matched setting, 8 antithetic "
                             "samples) while torch runs --samples plain ones: the quality-matched latency ratio")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one torch variant, print JSON
    args = parser.parse_args()
    batch, steps, warmup = DEFAULTS[args.case]
    args.batch = batch if args.batch is None else args.batch
    args.steps = steps if args.steps is None else args.steps
    args.warmup = warmup if args.warmup is None else args.warmup
    if min(args.batch, args.samples, args.steps, args.rounds, args.threads) < 1 or args.warmup < 0:
        raise SystemExit("--batch, --samples, --steps, --rounds and --threads must be at least 1, --warmup at least 0")
    if args.case == "forward":
        args.samples = 1
    if args.engine_fast and args.case != "predict":
        raise SystemExit("--engine-fast is for the predict case")
    if args.worker:
        return worker(args)
    if not os.path.isfile(args.engine):
        raise SystemExit(f"no engine binary at {args.engine}: `cargo build --release` or pass --engine")

    load_before = os.getloadavg()
    sides = ["engine"] + [f"torch {v}" for v in TORCH_VARIANTS[args.case]]
    times = {side: {} for side in sides}
    rss = {side: 0.0 for side in sides}
    header = None
    shapes = {}  # attention: direction -> its shapes
    for r in range(args.rounds):
        line = []
        for side in sides:
            report = engine_report(args) if side == "engine" else torch_report(args, side.split()[1])
            if side != "engine" and header is None:
                header = (f"torch {report['torch']}, {report['threads']} threads, float32 matmul precision "
                          f"'{report['matmul_precision']}'; engine {args.engine} ({report['threads']} threads)")
            for label, values in series(report).items():
                times[side].setdefault(label, []).extend(values)
            rss[side] = max(rss[side], report["peak_rss_mib"] or 0.0)
            for d in report.get("directions", []):
                shapes[d["direction"]] = f"q {d['q_shape']}, k/v {d['kv_shape']}"
            line.append(f"{side} " + ", ".join(f"{statistics.median(v) * 1e3:.1f}" for v in series(report).values()))
        print(f"round {r + 1}: " + "; ".join(line) + " ms", flush=True)

    what = {"train": "train step", "predict": f"predict, {args.samples} samples", "forward": "forward, one sample",
            "attention": f"probabilistic attention, {args.samples} samples", "cnn-ops": "CNN-branch ops",
            "saliency": "M2IB saliency of one image (10 steps x 10 copies)"}[args.case]
    # Other processes on the cores stall torch's OpenMP barriers far more than the engine's rayon
    # tasks (a stalled thread holds up every op): the load says how much of that a run saw.
    load = ", ".join(f"{a:.1f}/{b:.1f}" for a, b in zip(load_before, os.getloadavg()))
    print(f"\n{header}; load average (1, 5, 15 min) before/after: {load} on {os.cpu_count()} CPUs")
    print(f"{what}, config {args.config}, batch {args.batch}, {args.threads} threads, FP32, {args.rounds} rounds x "
          f"{args.steps} steps after {args.warmup} warm-up (median over all timed steps; range min-max)")
    if args.case == "attention":
        return attention_summary(times, rss, shapes)
    if args.case == "cnn-ops":
        return cnn_ops_summary(times)
    medians = {}
    for side in sides:
        medians[side], text = describe(times[side]["step"], args.batch)
        print(f"  {side:>14}: {text}, peak RSS {rss[side]:.0f} MiB")
    if args.engine_fast:
        print(f"  (engine: `predict --fast`, antithetic samples whose uncertainty-map error matches {args.samples} "
              f"plain ones' on the demo checkpoint: the quality-matched latency)")
    for side in sides[1:]:
        print(f"  ratio: the engine is {medians[side] / medians['engine']:.2f}x as fast as {side}")


def attention_summary(times, rss, shapes):
    """Per direction, forward and forward+backward of both sides side by side, and the ratios."""
    engine, torch_side = times["engine"], times["torch attention"]
    print(f"  {'':28} {'engine':>28}  {'torch (unfused)':>28}  engine speed-up")
    for direction, shape in shapes.items():
        print(f"  {direction}: {shape}")
        for part, name in (("forward", "forward"), ("forward_backward", "forward+backward")):
            label = f"{direction} {part}"
            e_med, e_text = describe(engine[label])
            t_med, t_text = describe(torch_side[label])
            print(f"    {name:<26} {e_text:>28}  {t_text:>28}  {t_med / e_med:.2f}x")
    print(f"  peak RSS: engine {rss['engine']:.0f} MiB, torch {rss['torch attention']:.0f} MiB")

def cnn_ops_summary(times):
    """Per op, the engine's and torch's median over the rounds, and the ratio."""
    engine, torch_side = times["engine"], times["torch cnn"]
    print(f"  {'op (engine NHWC, torch NCHW)':46} {'engine':>12} {'torch':>12}  engine speed-up")
    for label in engine:
        e, t = statistics.median(engine[label]), statistics.median(torch_side[label])
        print(f"  {label:46} {e * 1e3:9.2f} ms {t * 1e3:9.2f} ms  {t / e:.2f}x")


if __name__ == "__main__":
    main()
