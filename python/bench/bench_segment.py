#!/usr/bin/env python3
"""Times `mcs_engine.Segmenter.segment` from Python against the engine's `Segmenter::segment`
called from Rust, like for like (docs/python.md section 7): the same model folder loaded once on
the CPU, the same image decoded by the engine, the same prompt, samples and seed, one untimed
warm-up call each, then the median of many calls. The Rust side is the example program
python/examples/time_segment.rs; rounds of the two alternate so that a change of machine load
hits both.

    python python/bench/bench_segment.py [--samples 30] [--calls 5] [--rounds 12]

Needs the package installed (a wheel built by maturin) and cargo, or --rust-bin naming a built
`time_segment` example. (It lives in a folder of its own so that Python, which puts a script's
folder first on its path, imports the installed package and not the source folder python/mcs_engine.)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time
from pathlib import Path

import mcs_engine

HERE = Path(__file__).resolve().parent.parent  # python/
DEFAULT_IMAGE = HERE / "tests" / "data" / "lesion_grey.png"
DEFAULT_PROMPT = "one medium round-shaped lesion at the top left of the image"


def python_times(segmenter: mcs_engine.Segmenter, image, prompt: str, samples: int, calls: int) -> list:
    """Seconds of each of `calls` calls, after one untimed warm-up call."""
    segmenter.segment(image, prompt, samples=samples)
    seconds = []
    for _ in range(calls):
        started = time.perf_counter()
        segmenter.segment(image, prompt, samples=samples)
        seconds.append(time.perf_counter() - started)
    return seconds


def rust_times(command: list, model: Path, image: Path, prompt: str, samples: int, calls: int) -> list:
    """Seconds of each call the Rust example timed (it makes its own warm-up call)."""
    args = [str(model), str(image), prompt, str(samples), str(calls)]
    run = subprocess.run(command + args, capture_output=True, text=True, check=True)
    return [float(line) for line in run.stdout.split()]


def rust_command(rust_bin: str | None) -> list:
    if rust_bin:
        return [rust_bin]
    manifest = HERE.parent / "Cargo.toml"
    return ["cargo", "run", "--release", "--quiet", "--manifest-path", str(manifest), "-p", "mcs-engine-python",
            "--example", "time_segment", "--"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=mcs_engine.DEMO_MODEL, help="model folder (default: the demo)")
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE, help="PNG or JPEG image")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--samples", type=int, default=30, help="Monte-Carlo samples per call")
    parser.add_argument("--calls", type=int, default=5, help="timed calls per round and side")
    parser.add_argument("--rounds", type=int, default=12, help="alternating rounds of Rust and Python")
    parser.add_argument("--rust-bin", help="a built time_segment example (default: cargo run)")
    args = parser.parse_args()

    command = rust_command(args.rust_bin)
    segmenter = mcs_engine.Segmenter(args.model, device="cpu")
    image = mcs_engine.read_image(args.image)
    rust, python = [], []
    for _ in range(args.rounds):
        rust += rust_times(command, args.model, args.image, args.prompt, args.samples, args.calls)
        python += python_times(segmenter, image, args.prompt, args.samples, args.calls)

    def summary(seconds: list) -> str:
        quartiles = statistics.quantiles(seconds, n=4)
        return (
            f"fastest {1e3 * min(seconds):7.2f} ms, median {1e3 * statistics.median(seconds):7.2f} ms "
            f"(quartiles {1e3 * quartiles[0]:.2f} .. {1e3 * quartiles[2]:.2f})"
        )

    height, width = image.shape[:2]
    print(f"{args.image.name} ({width}x{height}), {args.samples} samples, {len(rust)} calls per side, CPU")
    print(f"Rust   Segmenter::segment  {summary(rust)}")
    print(f"Python Segmenter.segment   {summary(python)}")
    # On a busy machine the fastest call is the steadier estimate (the least disturbed one).
    for name, pick in (("median", statistics.median), ("fastest", min)):
        print(f"binding overhead, {name} against {name}: {100 * (pick(python) / pick(rust) - 1):+.1f} %")
    print(f"load average (1, 5, 15 min): {os.getloadavg()} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
