"""What `Segmenter.segment`, `segment_batch` and `read_image` return, and how images are taken."""

from __future__ import annotations

import math

import numpy as np
import pytest

import mcs_engine
from conftest import COLOUR_PNG, GREY_PNG, PROMPT, SAMPLES


def test_maps_have_the_images_size_and_documented_types(segmenter, colour_image):
    result = segmenter.segment(colour_image, PROMPT, samples=SAMPLES, resize="bilinear")
    assert result.mask.shape == result.probability.shape == result.uncertainty.shape == (37, 53)
    assert result.mask.dtype == np.bool_
    assert result.probability.dtype == result.uncertainty.dtype == np.float32
    # With resize="bilinear" the mask is the thresholded probability at the image's size.
    np.testing.assert_array_equal(result.mask, result.probability > np.float32(0.5))
    assert 0.0 <= result.probability.min() and result.probability.max() <= 1.0
    assert 0.0 <= result.uncertainty.min() and result.uncertainty.max() <= math.log(2) + 1e-6
    assert result.foreground_fraction == result.mask.mean()
    # The engine sums in f64 in pixel order, NumPy pairwise: equal up to f64 rounding.
    assert result.mean_uncertainty == pytest.approx(float(result.uncertainty.astype(np.float64).mean()), rel=1e-12)
    assert "37" in repr(result) and "53" in repr(result)


def test_the_demo_checkpoint_finds_the_named_lesion(segmenter):
    # The prompt names the upper-left of two lesions (README's example): the mask is one small
    # region whose centre lies in the image's top-left quarter.
    result = segmenter.segment(mcs_engine.read_image(GREY_PNG), PROMPT)
    assert 0.01 < result.foreground_fraction < 0.2
    rows, cols = np.nonzero(result.mask)
    assert rows.mean() < 48 and cols.mean() < 48
    assert result.mean_uncertainty < 0.1


def test_the_seed_decides_the_noise(segmenter, colour_image):
    first = segmenter.segment(colour_image, PROMPT, samples=SAMPLES, seed=3)
    again = segmenter.segment(colour_image, PROMPT, samples=SAMPLES, seed=3)
    other = segmenter.segment(colour_image, PROMPT, samples=SAMPLES, seed=4)
    np.testing.assert_array_equal(first.probability, again.probability)
    np.testing.assert_array_equal(first.uncertainty, again.uncertainty)
    assert not np.array_equal(first.probability, other.probability)


def test_threshold_only_moves_the_mask(segmenter, colour_image):
    low = segmenter.segment(colour_image, PROMPT, samples=SAMPLES, threshold=0.1, resize="bilinear")
    high = segmenter.segment(colour_image, PROMPT, samples=SAMPLES, threshold=0.9, resize="bilinear")
    np.testing.assert_array_equal(low.probability, high.probability)
    np.testing.assert_array_equal(low.mask, low.probability > np.float32(0.1))
    np.testing.assert_array_equal(high.mask, high.probability > np.float32(0.9))


def test_rgb_and_bgr_orders_see_the_same_pixels(segmenter, colour_image):
    rgb = segmenter.segment(colour_image, PROMPT, samples=SAMPLES)
    bgr = segmenter.segment(colour_image[:, :, ::-1], PROMPT, samples=SAMPLES, channels="bgr")
    np.testing.assert_array_equal(rgb.probability, bgr.probability)
    # The order matters: the same array read as B, G, R is another image.
    swapped = segmenter.segment(colour_image, PROMPT, samples=SAMPLES, channels="bgr")
    assert not np.array_equal(rgb.probability, swapped.probability)


def test_grey_layouts_and_alpha(segmenter, colour_image):
    grey = colour_image[:, :, 1]
    plain = segmenter.segment(grey, PROMPT, samples=SAMPLES)
    for layout in (grey[:, :, np.newaxis], np.repeat(grey[:, :, np.newaxis], 3, axis=2)):
        np.testing.assert_array_equal(segmenter.segment(layout, PROMPT, samples=SAMPLES).probability, plain.probability)
    alpha = np.random.default_rng(1).integers(0, 256, size=grey.shape + (1,), dtype=np.uint8)
    rgba = np.concatenate([colour_image, alpha], axis=2)
    np.testing.assert_array_equal(
        segmenter.segment(rgba, PROMPT, samples=SAMPLES).probability,
        segmenter.segment(colour_image, PROMPT, samples=SAMPLES).probability,
    )


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_float_images_are_scaled_to_eight_bits(segmenter, colour_image, dtype):
    # Every uint8 value v is exactly v / 255 after rounding to the nearest 8-bit level, so the
    # float image must give the uint8 image's maps bit for bit (float16 keeps 11 bits: enough).
    as_float = (colour_image.astype(np.float64) / 255.0).astype(dtype)
    np.testing.assert_array_equal(
        segmenter.segment(as_float, PROMPT, samples=SAMPLES).probability,
        segmenter.segment(colour_image, PROMPT, samples=SAMPLES).probability,
    )


def test_strided_and_non_numpy_inputs(segmenter, colour_image):
    wide = np.zeros((74, 106, 3), dtype=np.uint8)
    wide[::2, ::2] = colour_image
    reference = segmenter.segment(colour_image, PROMPT, samples=SAMPLES).probability
    np.testing.assert_array_equal(segmenter.segment(wide[::2, ::2], PROMPT, samples=SAMPLES).probability, reference)

    class Picture:
        # What PIL images and other array-likes offer numpy.asarray.
        def __array__(self, dtype=None, copy=None):
            return colour_image

    np.testing.assert_array_equal(segmenter.segment(Picture(), PROMPT, samples=SAMPLES).probability, reference)
    # A nested list of ints is int64 to NumPy: refused like any non-uint8 integer array.
    with pytest.raises(ValueError, match="dtype int64"):
        segmenter.segment(colour_image.tolist(), PROMPT, samples=SAMPLES)


def test_batch_items_have_their_own_sizes_and_equal_single_calls(segmenter, colour_image):
    grey = mcs_engine.read_image(GREY_PNG)
    for images, prompts in [([colour_image, grey], [PROMPT, "two lesions"]), ([grey, colour_image], ["two lesions", PROMPT])]:
        results = segmenter.segment_batch(images, prompts, samples=SAMPLES, seed=9)
        assert [r.probability.shape for r in results] == [i.shape[:2] for i in images]
        # Every item, at any position, is its single call bit for bit (noise keyed by the draw).
        for image, prompt, result in zip(images, prompts, results):
            single = segmenter.segment(image, prompt, samples=SAMPLES, seed=9)
            np.testing.assert_array_equal(result.probability, single.probability)
            np.testing.assert_array_equal(result.uncertainty, single.uncertainty)
            np.testing.assert_array_equal(result.mask, single.mask)
    assert segmenter.segment_batch([], [], samples=SAMPLES) == []


def test_resize_chooses_how_the_mask_reaches_the_image_size(segmenter, colour_image):
    bilinear = segmenter.segment(colour_image, PROMPT, samples=SAMPLES, resize="bilinear")
    official = segmenter.segment(colour_image, PROMPT, samples=SAMPLES)
    # bilinear thresholds the full-resolution probability; official (the default) resizes the
    # model-size mask nearest, so it differs somewhere on this 53 x 37 image; the maps are the same.
    np.testing.assert_array_equal(bilinear.mask, bilinear.probability > 0.5)
    np.testing.assert_array_equal(official.probability, bilinear.probability)
    assert (official.mask != bilinear.mask).any()
    with pytest.raises(ValueError, match="unknown mask resize"):
        segmenter.segment(colour_image, PROMPT, samples=SAMPLES, resize="cubic")


def test_read_image_decodes_as_the_engine(segmenter):
    rgb = mcs_engine.read_image(COLOUR_PNG)
    bgr = mcs_engine.read_image(COLOUR_PNG, channels="bgr")
    assert rgb.shape == (96, 96, 3) and rgb.dtype == np.uint8 and rgb.flags.c_contiguous
    np.testing.assert_array_equal(rgb, bgr[:, :, ::-1])
    assert not np.array_equal(rgb, bgr)
    grey = mcs_engine.read_image(GREY_PNG)
    assert grey.shape == (96, 96, 3)
    np.testing.assert_array_equal(grey[:, :, 0], grey[:, :, 2])


def test_segmenter_describes_itself(segmenter):
    assert segmenter.device == "cpu"
    assert segmenter.model == mcs_engine.DEMO_MODEL
    assert segmenter.image_size == 96
    assert "cpu" in repr(segmenter)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (mcs_engine.DEMO_MODEL / name).is_file()
