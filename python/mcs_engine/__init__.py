"""mcs_engine: text-prompted medical image segmentation with per-pixel uncertainty.

MedCLIPSeg as run by the mcs-engine Rust engine, from NumPy arrays::

    from mcs_engine import Segmenter
    result = Segmenter().segment(image, "one small round lesion at the top left")

``result.mask`` (bool), ``result.probability`` and ``result.uncertainty`` (float32) have the
image's height and width. Without a ``model`` the demo checkpoint shipped inside the package is
used (trained on the engine's synthetic ultrasound task: it segments nothing else).

Images are NumPy arrays (or anything ``numpy.asarray`` takes, such as a PIL image): ``H x W``
(grey) or ``H x W x C`` with C = 1, 3 or 4 (alpha is dropped), uint8, or floats in [0, 1]. Colour
images are read as R, G, B unless ``channels="bgr"`` (OpenCV's order) is passed. The package's
guide is docs/python.md in the engine's repository.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence, Tuple, Union

import numpy as np

from . import _native
from ._errors import FileError, InvalidInputError, McsEngineError, MissingFileError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DEMO_MODEL",
    "FileError",
    "InvalidInputError",
    "McsEngineError",
    "MissingFileError",
    "Segmentation",
    "Segmenter",
    "read_image",
]

#: The most pixels (width x height) an image may have unless ``max_pixels`` says otherwise
#: (100 megapixels; the maps take about 9 bytes per pixel).
DEFAULT_MAX_PIXELS: int = _native.DEFAULT_MAX_PIXELS

#: The demo checkpoint inside the package (config.json, model.safetensors, tokenizer.json): the
#: engine's default ``train`` run on its synthetic ultrasound task, validation Dice 0.90.
DEMO_MODEL: Path = Path(__file__).resolve().parent / "demo"

PathLike = Union[str, "os.PathLike[str]"]

_CHANNEL_ORDERS = ("rgb", "bgr")


@dataclass(frozen=True, eq=False)
class Segmentation:
    """One image's result; every map has the input image's height and width.

    Attributes:
        mask: bool array, the mask at the image's size (``resize`` says how it is made; with
            ``"bilinear"`` it is ``probability > threshold``).
        probability: float32 array, the mean foreground probability over the Monte-Carlo samples.
        uncertainty: float32 array, the binary entropy of that mean in nats (0 to ln 2 = 0.693).
        foreground_fraction: the share of the pixels in the mask (0 to 1).
        mean_uncertainty: the mean of ``uncertainty`` over the pixels (nats).
    """

    mask: np.ndarray
    probability: np.ndarray
    uncertainty: np.ndarray
    foreground_fraction: float
    mean_uncertainty: float

    def __repr__(self) -> str:
        height, width = self.mask.shape
        return (
            f"Segmentation({width}x{height}, foreground_fraction={self.foreground_fraction:.4f}, "
            f"mean_uncertainty={self.mean_uncertainty:.4f})"
        )


class Segmenter:
    """A loaded MedCLIPSeg model: load once, then segment many images, from any number of threads.

    Args:
        model: a model folder as ``mcs-engine train`` writes it (``config.json``,
            ``model.safetensors``, ``tokenizer.json``), e.g. ``runs/train/best``. ``None``: the demo
            checkpoint shipped in the package (:data:`DEMO_MODEL`).
        device: ``"auto"`` (the first GPU when one can be used, else the CPU), ``"cpu"``,
            ``"cuda"`` or ``"cuda:N"``.

    Raises:
        MissingFileError: (a ``FileNotFoundError``) the folder or one of its files does not exist.
        InvalidInputError: (a ``ValueError``) a file that does not parse or does not fit the others,
            or an unknown device name.
        McsEngineError: a GPU was asked for that cannot be used here.

    A call releases the GIL while the engine works, so calls from several Python threads run in
    parallel and share the loaded weights.
    """

    def __init__(self, model: PathLike | None = None, device: str = "auto") -> None:
        folder = DEMO_MODEL if model is None else Path(os.fspath(model))
        if not isinstance(device, str):
            raise TypeError(f"device must be a str such as 'cpu' or 'cuda:0', not {type(device).__name__}")
        self._native = _native.Segmenter(str(folder), device)
        self._folder = folder

    @property
    def device(self) -> str:
        """Where the model runs: ``"cpu"`` or ``"cuda:N"``."""
        return self._native.device

    @property
    def model(self) -> Path:
        """The model folder this segmenter was loaded from."""
        return self._folder

    @property
    def image_size(self) -> int:
        """The side of the model's square input in pixels (images of any size are resized to it
        and the maps resized back)."""
        return self._native.image_size

    def __repr__(self) -> str:
        return f"Segmenter(model={str(self.model)!r}, device={self.device!r})"

    def segment(
        self,
        image: np.ndarray,
        prompt: str,
        samples: int = 30,
        seed: int = 666,
        noise: str = "plain",
        threshold: float = 0.5,
        *,
        channels: str = "rgb",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        resize: str = "official",
    ) -> Segmentation:
        """Segments what ``prompt`` describes in ``image``.

        Args:
            image: ``H x W`` or ``H x W x C`` (C = 1, 3 or 4; a fourth channel, alpha, is dropped),
                uint8 (0 to 255) or floating point in [0, 1] (scaled by 255 and rounded to the
                nearest integer, halves up, as the engine works on 8-bit pixels).
            prompt: what to segment, e.g. ``"one small round lesion at the top left"``.
            samples: Monte-Carlo samples (the paper uses 30), at least 1.
            seed: seed of the sampling noise, 0 to 2**64 - 1: the same seed gives the same maps,
                bit for bit, and those of ``mcs-engine predict --seed`` on the CPU.
            noise: ``"plain"`` (independent draws, as the official code) or ``"antithetic"``
                (draw 2j+1 uses the negated noise of draw 2j).
            threshold: a pixel is in the mask when its probability is above this (0 to 1).
            channels: the order of a colour image's channels: ``"rgb"`` (PIL, imageio,
                scikit-image, matplotlib) or ``"bgr"`` (OpenCV's ``cv2.imread``).
            max_pixels: the most pixels (width x height) the image may have.
            resize: how the mask reaches the image's size: ``"official"`` (the mean probability
                thresholded at the model's resolution, then resized nearest, as the official
                evaluation and ``mcs-engine eval`` score it) or ``"bilinear"`` (the full-resolution
                probability thresholded). The probability and uncertainty maps are the same either
                way.

        Returns:
            The :class:`Segmentation`, at the image's own size.

        Raises:
            InvalidInputError: (a ``ValueError``) a bad image (dtype, number of dimensions or
                channels, no pixels, values outside [0, 1] or not finite, too many pixels), an empty
                prompt or one longer than the model reads, options out of range, more samples than
                this machine's memory holds.
            McsEngineError: a device failure.
        """
        pixels = _engine_image(image, channels)
        _check_prompt(prompt)
        maps = self._native.segment(pixels, prompt, *_sampling(samples, seed, noise, threshold, max_pixels, resize))
        return Segmentation(*maps)

    def segment_batch(
        self,
        images: Sequence[np.ndarray],
        prompts: Sequence[str],
        samples: int = 30,
        seed: int = 666,
        noise: str = "plain",
        threshold: float = 0.5,
        *,
        channels: str = "rgb",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        resize: str = "official",
    ) -> List[Segmentation]:
        """Segments ``images[i]`` for ``prompts[i]`` in one batched pass (images of any sizes;
        each result at its own image's size). Arguments as :meth:`segment`; ``images`` and
        ``prompts`` must have the same length.

        Every item equals :meth:`segment` of its image and prompt bit for bit, whatever its
        position and whatever else the batch holds (the engine keys the Monte-Carlo noise by the
        draw, not by the batch position).

        Raises:
            InvalidInputError: as :meth:`segment`, naming the item (0-based) at fault, or lists of
                different lengths.
        """
        images, prompts = list(images), list(prompts)
        if len(images) != len(prompts):
            raise InvalidInputError(f"{len(images)} images but {len(prompts)} prompts: give one prompt per image")
        pixels = []
        for i, (image, prompt) in enumerate(zip(images, prompts)):
            try:
                pixels.append(_engine_image(image, channels))
                _check_prompt(prompt)
            except InvalidInputError as error:
                raise InvalidInputError(f"item {i}: {error}") from None
        results = self._native.segment_batch(pixels, prompts, *_sampling(samples, seed, noise, threshold, max_pixels, resize))
        return [Segmentation(*maps) for maps in results]


def read_image(path: PathLike, channels: str = "rgb", *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Reads a PNG or JPEG file as the engine (and ``mcs-engine predict --image``) does.

    Returns an ``H x W x 3`` uint8 array in the order ``channels`` names (``"rgb"`` by default, so
    that ``Segmenter.segment(read_image(path), prompt)`` sees exactly the pixels ``predict``
    sees); grey files are replicated to three channels, alpha is dropped and 16-bit samples are cut
    to their high byte, as ``cv2.imread`` does.

    Raises:
        MissingFileError: (a ``FileNotFoundError``) no such file.
        InvalidInputError: (a ``ValueError``) a folder, a file that is not a readable PNG or JPEG,
            an image of more than ``max_pixels`` pixels (checked from its header before decoding).
    """
    order = _channel_order(channels)
    bgr = _native.read_image(os.fspath(path), _whole("max_pixels", max_pixels, least=1, bits=64))
    return bgr if order == "bgr" else np.ascontiguousarray(bgr[..., ::-1])


def _channel_order(channels: str) -> str:
    if channels not in _CHANNEL_ORDERS:
        raise InvalidInputError(f"channels={channels!r}: expected 'rgb' or 'bgr'")
    return channels


def _engine_image(image: np.ndarray, channels: str) -> np.ndarray:
    """The caller's image as the engine takes it: ``H x W x 1`` (grey) or ``H x W x 3`` (B, G, R),
    uint8, C order."""
    order = _channel_order(channels)
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, np.newaxis]
    if array.ndim != 3:
        raise InvalidInputError(
            f"expected an image of shape (height, width) or (height, width, channels), got shape {array.shape}"
        )
    if array.shape[2] not in (1, 3, 4):
        raise InvalidInputError(
            "expected 1 (grey), 3 (colour) or 4 (colour and alpha) channels, "
            f"got {array.shape[2]} (shape {array.shape})"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise InvalidInputError(f"the image has no pixels (shape {array.shape})")
    array = _as_uint8(array)
    array = array[:, :, :3]
    if array.shape[2] == 3 and order == "rgb":
        array = array[:, :, ::-1]
    return np.ascontiguousarray(array)


def _as_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if not np.issubdtype(array.dtype, np.floating):
        raise InvalidInputError(
            f"image dtype {array.dtype} is not supported: pass uint8 (0 to 255) or floating point in [0, 1]"
        )
    values = array.astype(np.float64)
    if not np.isfinite(values).all():
        raise InvalidInputError("the image holds NaN or infinite values: a float image must lie in [0, 1]")
    low, high = float(values.min()), float(values.max())
    if low < 0.0 or high > 1.0:
        raise InvalidInputError(
            f"a float image must lie in [0, 1], but its values run from {low:g} to {high:g} "
            "(for 0 to 255 pass uint8, e.g. image.astype(numpy.uint8))"
        )
    return np.floor(values * 255.0 + 0.5).astype(np.uint8)


def _check_prompt(prompt: str) -> None:
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, not {type(prompt).__name__}")


def _whole(name: str, value: int, *, least: int, bits: int) -> int:
    """A whole number argument in [least, 2**bits - 1], as an int."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not least <= int(value) < 2**bits:
        raise InvalidInputError(f"{name}={value}: expected a whole number from {least} to {2**bits - 1}")
    return int(value)


def _sampling(
    samples: int, seed: int, noise: str, threshold: float, max_pixels: int, resize: str
) -> Tuple[int, int, str, float, int, str]:
    """The sampling arguments of the native calls, checked for what Python must catch before the
    engine sees them (negative or oversized integers, wrong types); the engine checks the rest
    (samples against memory, the threshold's range, the noise mode)."""
    if not isinstance(noise, str):
        raise TypeError(f"noise must be 'plain' or 'antithetic', not {type(noise).__name__}")
    if not isinstance(resize, str):
        raise TypeError(f"resize must be 'official' or 'bilinear', not {type(resize).__name__}")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating, np.integer)):
        raise TypeError(f"threshold must be a number in [0, 1], not {type(threshold).__name__}")
    return (
        _whole("samples", samples, least=1, bits=63),
        _whole("seed", seed, least=0, bits=64),
        noise,
        float(threshold),
        _whole("max_pixels", max_pixels, least=1, bits=63),
        resize,
    )
