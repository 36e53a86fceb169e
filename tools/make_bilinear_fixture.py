#!/usr/bin/env python3
"""Writes tests/fixtures/bilinear_torch.json: PyTorch's own answers for
F.interpolate(mode="bilinear", align_corners=False) and its input gradient, on small CPU float32
inputs, so tests/spatial.rs can check the engine's source-index rule without torch installed.

Usage (from the repository root, with a Python that has torch):
    python tools/make_bilinear_fixture.py

Inputs and upstream gradients are multiples of 1/8 in [-4, 4], which JSON holds exactly; outputs
are written with 9 significant digits, enough to round-trip every float32.
"""
import json
import pathlib

import torch
import torch.nn.functional as F

# (input shape [N, C, H, W], output size (H', W')): up- and downsampling, integer and
# non-integer ratios, the decoder's 4x ratio, a 1x1 input, and an unchanged axis.
CASES = [
    ([1, 1, 4, 4], (16, 16)),
    ([1, 2, 3, 5], (7, 4)),
    ([1, 1, 9, 7], (4, 3)),
    ([2, 1, 7, 5], (11, 13)),
    ([1, 1, 1, 1], (3, 2)),
    ([1, 1, 6, 10], (6, 3)),
    ([1, 1, 14, 14], (56, 56)),
    ([1, 1, 16, 16], (4, 4)),
    ([1, 1, 5, 3], (13, 8)),
]


def eighths(generator, shape):
    """Values k/8 for integers k in [-32, 32]."""
    return torch.randint(-32, 33, shape, generator=generator).to(torch.float32) / 8


def floats(t):
    return [float(f"{v:.9g}") for v in t.detach().reshape(-1).tolist()]


def main():
    generator = torch.Generator().manual_seed(20240607)
    cases = []
    for in_shape, size in CASES:
        x = eighths(generator, in_shape).requires_grad_(True)
        y = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        upstream = eighths(generator, list(y.shape))
        (y * upstream).sum().backward()
        cases.append(
            {
                "input_shape": in_shape,
                "output_size": list(size),
                "input": floats(x),
                "output": floats(y),
                "output_grad": floats(upstream),
                "input_grad": floats(x.grad),
            }
        )
    fixture = {
        "generator": "tools/make_bilinear_fixture.py",
        "torch": torch.__version__,
        "op": 'F.interpolate(x, size=output_size, mode="bilinear", align_corners=False), float32, CPU',
        "cases": cases,
    }
    out = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "bilinear_torch.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(fixture, separators=(",", ":")) + "\n")
    print(f"wrote {out} ({out.stat().st_size} bytes, {len(cases)} cases)")


if __name__ == "__main__":
    main()
