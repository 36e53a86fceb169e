"""Shared fixtures of the mcs_engine tests: the demo checkpoint on the CPU and two small images.

data/lesion_grey.png is image Test_Folder/img/synthetic_002201.png of `mcs-engine synth` (96 px,
grey, two lesions; PROMPT names the upper one, as in the repository's README); data/lesion_colour.png
is the overlay.png `mcs-engine predict` wrote for it (96 px, colour), so that channel order matters.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import List, Optional

import numpy as np
import pytest

import mcs_engine

DATA = Path(__file__).resolve().parent / "data"
GREY_PNG = DATA / "lesion_grey.png"
COLOUR_PNG = DATA / "lesion_colour.png"
PROMPT = "one medium round-shaped lesion at the top left of the image"
REPO = Path(__file__).resolve().parents[2]

# Few samples keep each call well under a second on two cores; the equalities tested hold for any
# number of samples.
SAMPLES = 6


@pytest.fixture(scope="session")
def segmenter() -> mcs_engine.Segmenter:
    """The demo checkpoint on the CPU (the bit-for-bit comparisons with the CLI are CPU ones)."""
    return mcs_engine.Segmenter(device="cpu")


@pytest.fixture(scope="session")
def colour_image() -> np.ndarray:
    """A non-square random R, G, B image (odd sizes, so every resize has work to do)."""
    return np.random.default_rng(5).integers(0, 256, size=(37, 53, 3), dtype=np.uint8)


def cli_command() -> Optional[List[str]]:
    """How to run `mcs-engine`: $MCS_ENGINE_BIN (.ci/run sets it to the release binary), else
    `cargo run --release` in the checkout these tests belong to; None when neither is there."""
    binary = os.environ.get("MCS_ENGINE_BIN")
    if binary:
        if not Path(binary).is_file():
            raise FileNotFoundError(f"MCS_ENGINE_BIN={binary} is not a file")
        return [binary]
    cargo = shutil.which("cargo")
    if cargo and (REPO / "Cargo.toml").is_file():
        manifest = str(REPO / "Cargo.toml")
        return [cargo, "run", "--release", "--quiet", "--manifest-path", manifest, "--bin", "mcs-engine", "--"]
    return None
