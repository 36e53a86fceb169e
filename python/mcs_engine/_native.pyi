"""Type stubs of the native module ``mcs_engine._native`` (built from python/src/lib.rs).

Use the wrappers in :mod:`mcs_engine` instead: they accept any image layout, dtype and channel
order and return :class:`mcs_engine.Segmentation` objects. These functions take exactly what the
engine takes.
"""

from os import PathLike
from pathlib import Path
from typing import List, Optional, Tuple, Union

import numpy as np
import numpy.typing as npt

#: The default image size limit in pixels (100 megapixels).
DEFAULT_MAX_PIXELS: int

#: ``(mask, probability, uncertainty, foreground_fraction, mean_uncertainty)``.
Maps = Tuple[npt.NDArray[np.bool_], npt.NDArray[np.float32], npt.NDArray[np.float32], float, float]

class Segmenter:
    """A loaded model folder on a device; calls release the GIL."""

    def __init__(self, model: Union[str, PathLike[str]], device: str = "auto") -> None:
        """Loads the model folder ``model`` onto ``device`` ("auto", "cpu", "cuda", "cuda:N")."""
    @property
    def device(self) -> str:
        """The device the model runs on ("cpu", "cuda:0", ...)."""
    @property
    def model(self) -> Optional[Path]:
        """The folder the model was loaded from."""
    @property
    def image_size(self) -> int:
        """The side of the model's square input in pixels."""
    @property
    def config_name(self) -> str:
        """The model config's name."""
    def segment(
        self,
        image: npt.NDArray[np.uint8],
        prompt: str,
        samples: int,
        seed: int,
        noise: str,
        threshold: float,
        max_pixels: int,
        resize: str,
    ) -> Maps:
        """Segments one ``(height, width, 1 | 3)`` uint8 B, G, R (or grey) image in C order."""
    def segment_batch(
        self,
        images: List[npt.NDArray[np.uint8]],
        prompts: List[str],
        samples: int,
        seed: int,
        noise: str,
        threshold: float,
        max_pixels: int,
        resize: str,
    ) -> List[Maps]:
        """Segments image ``i`` for prompt ``i`` in one pass; lists of equal length."""

def read_image(path: Union[str, PathLike[str]], max_pixels: int = ...) -> npt.NDArray[np.uint8]:
    """Decodes a PNG or JPEG file as the engine does: ``(height, width, 3)`` uint8, B, G, R."""
