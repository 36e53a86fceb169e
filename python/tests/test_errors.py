"""Bad input raises a Python exception carrying the engine's message, never a crash."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import mcs_engine
from conftest import COLOUR_PNG, PROMPT

GOOD = np.zeros((8, 8, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    "image, prompt, options, message",
    [
        (GOOD, "", {}, "empty prompt"),
        (GOOD, "   ", {}, "empty prompt"),
        (GOOD.astype(np.int64), PROMPT, {}, "dtype int64"),
        (GOOD.astype(bool), PROMPT, {}, "dtype bool"),
        (np.full((8, 8), 1.5), PROMPT, {}, "from 1.5 to 1.5"),
        (np.full((8, 8), -0.25, dtype=np.float32), PROMPT, {}, "[0, 1]"),
        (np.full((8, 8), np.nan), PROMPT, {}, "NaN"),
        (np.zeros((2, 8, 8, 3), dtype=np.uint8), PROMPT, {}, "shape (2, 8, 8, 3)"),
        (np.zeros(8, dtype=np.uint8), PROMPT, {}, "shape (8,)"),
        (np.zeros((8, 8, 2), dtype=np.uint8), PROMPT, {}, "got 2"),
        (np.zeros((0, 8, 3), dtype=np.uint8), PROMPT, {}, "no pixels"),
        (GOOD, PROMPT, {"samples": 0}, "samples=0"),
        (GOOD, PROMPT, {"seed": -1}, "seed=-1"),
        (GOOD, PROMPT, {"threshold": 1.5}, "threshold 1.5"),
        (GOOD, PROMPT, {"threshold": float("nan")}, "threshold NaN"),
        (GOOD, PROMPT, {"noise": "gaussian"}, "unknown noise mode `gaussian`"),
        (GOOD, PROMPT, {"channels": "rgba"}, "channels='rgba'"),
        (GOOD, PROMPT, {"max_pixels": 63}, "image too large (8x8)"),
        (GOOD, PROMPT, {"samples": 10**15}, "do not fit in this machine's"),
    ],
)
def test_invalid_input_is_a_value_error_with_the_reason(segmenter, image, prompt, options, message):
    with pytest.raises(ValueError) as caught:
        segmenter.segment(image, prompt, **options)
    assert message in str(caught.value)
    assert isinstance(caught.value, mcs_engine.InvalidInputError)
    assert isinstance(caught.value, mcs_engine.McsEngineError)


def test_wrong_argument_types_are_type_errors(segmenter):
    with pytest.raises(TypeError):
        segmenter.segment(GOOD, None)
    with pytest.raises(TypeError):
        segmenter.segment(GOOD, PROMPT, samples=2.5)
    with pytest.raises(TypeError):
        segmenter.segment(GOOD, PROMPT, threshold="high")


def test_batch_errors_name_the_item(segmenter):
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        segmenter.segment_batch([GOOD, GOOD], [PROMPT])
    with pytest.raises(ValueError, match=r"item 1: .*dtype int64"):
        segmenter.segment_batch([GOOD, GOOD.astype(np.int64)], [PROMPT, PROMPT])
    with pytest.raises(ValueError, match="item 1: empty prompt"):
        segmenter.segment_batch([GOOD, GOOD], [PROMPT, ""], samples=1)


def test_a_missing_model_folder_or_file_is_file_not_found(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError) as caught:
        mcs_engine.Segmenter(missing, device="cpu")
    assert caught.value.filename == str(missing) and str(missing) in str(caught.value)
    assert isinstance(caught.value, mcs_engine.McsEngineError)

    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(mcs_engine.DEMO_MODEL / name, partial / name)
    with pytest.raises(FileNotFoundError, match="missing model.safetensors") as caught:
        mcs_engine.Segmenter(partial, device="cpu")
    assert caught.value.filename == str(partial / "model.safetensors")


def test_a_damaged_model_file_is_a_value_error_naming_it(tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(mcs_engine.DEMO_MODEL, damaged)
    (damaged / "config.json").write_text("{ not json")
    with pytest.raises(ValueError, match="config.json"):
        mcs_engine.Segmenter(damaged, device="cpu")
    with pytest.raises(ValueError, match="unknown device|device"):
        mcs_engine.Segmenter(device="tpu")


def test_read_image_errors(tmp_path):
    with pytest.raises(FileNotFoundError) as caught:
        mcs_engine.read_image(tmp_path / "absent.png")
    assert caught.value.filename == str(tmp_path / "absent.png")
    assert "absent.png" in str(caught.value)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ValueError, match="not a readable PNG or JPEG"):
        mcs_engine.read_image(text)
    with pytest.raises(ValueError, match="is a folder"):
        mcs_engine.read_image(tmp_path)
    with pytest.raises(ValueError, match="too large"):
        mcs_engine.read_image(COLOUR_PNG, max_pixels=100)


def test_a_gpu_that_cannot_be_used_is_an_engine_error():
    if mcs_engine.Segmenter(device="auto").device != "cpu":
        pytest.skip("a GPU is usable here")
    with pytest.raises(mcs_engine.McsEngineError, match="CUDA is not available"):
        mcs_engine.Segmenter(device="cuda")
