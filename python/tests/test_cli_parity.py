"""The package's maps equal `mcs-engine predict`'s for the same image, prompt and options, bit for
bit, on the CPU (`predict` reads the PNG with the engine's decoder, as `mcs_engine.read_image`)."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

import mcs_engine
from conftest import COLOUR_PNG, GREY_PNG, PROMPT, cli_command


@pytest.mark.parametrize(
    "png, seed, samples, noise, threshold",
    [(GREY_PNG, 666, 8, "plain", 0.5), (COLOUR_PNG, 12345, 5, "antithetic", 0.3)],
)
def test_package_equals_predict(segmenter, tmp_path, png, seed, samples, noise, threshold):
    command = cli_command()
    if command is None:
        pytest.skip("no mcs-engine binary: set MCS_ENGINE_BIN or put cargo on PATH")
    out = tmp_path / "predict"
    # fmt: off
    args = ["predict", "--image", str(png), "--prompt", PROMPT, "--seed", str(seed), "--samples", str(samples),
            "--noise", noise, "--threshold", str(threshold), "--device", "cpu",
            "--model", str(mcs_engine.DEMO_MODEL), "--out", str(out)]
    # fmt: on
    run = subprocess.run(command + args, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr

    result = segmenter.segment(
        mcs_engine.read_image(png), PROMPT, samples=samples, seed=seed, noise=noise, threshold=threshold
    )
    probability = np.load(out / "probability.npy")
    uncertainty = np.load(out / "uncertainty.npy")
    assert probability.dtype == uncertainty.dtype == np.float32
    np.testing.assert_array_equal(result.probability, probability)
    np.testing.assert_array_equal(result.uncertainty, uncertainty)
    mask_png = mcs_engine.read_image(out / "mask.png")
    np.testing.assert_array_equal(result.mask, mask_png[:, :, 0] == 255)
    # The maps are not trivial: some pixels on each side of the threshold.
    assert 0 < result.mask.sum() < result.mask.size
