"""The one preprocessing pipeline shared by training, evaluation and the daemon.

It is built from the ``preprocessing`` block of ``model.json`` so a model directory fully describes how its
inputs must look; nothing here depends on where the pixels came from (PNG/JPEG or DICOM).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from monai.transforms import (
    Compose,
    EnsureChannelFirst,
    EnsureType,
    Resize,
    ScaleIntensityRangePercentiles,
    SpatialPad,
)

from triaged.ml.spec import PREPROCESSING_KIND, PreprocessingConfig

# PreprocessingConfig lives in the torch-free ml.spec (`model info` reads it without torch); re-exported here.
__all__ = ["PREPROCESSING_KIND", "PreprocessingConfig", "build_preprocess", "content_box", "preprocess_slice"]


def build_preprocess(config: PreprocessingConfig) -> Compose:
    """Return the MONAI ``Compose`` mapping a 2-D float slice (H, W) to a (1, S, S) float32 tensor in [0, 1].

    Steps: channel-first, percentile intensity scaling with clipping (makes 8-bit JPEGs and 12/16-bit DICOM
    comparable), aspect-preserving resize of the longest side to ``input_size`` (anti-aliased when shrinking),
    centred zero padding to a square.
    """
    size = config.input_size
    return Compose(
        [
            EnsureChannelFirst(channel_dim="no_channel"),
            ScaleIntensityRangePercentiles(
                lower=config.lower_percentile,
                upper=config.upper_percentile,
                b_min=0.0,
                b_max=1.0,
                clip=True,
                dtype=np.float32,
            ),
            Resize(spatial_size=size, size_mode="longest", mode=config.interpolation, anti_aliasing=True),
            SpatialPad(spatial_size=(size, size), method="symmetric", mode="constant"),
            EnsureType(data_type="tensor", dtype=torch.float32, track_meta=False),
        ]
    )


def preprocess_slice(preprocess: Compose, pixels: np.ndarray) -> torch.Tensor:
    """Apply ``preprocess`` to one 2-D slice, validating the input first (bad shapes fail loudly)."""
    if pixels.ndim != 2:
        raise ValueError(f"expected a 2-D slice, got shape {pixels.shape}")
    with warnings.catch_warnings():
        # A blank slice (all pixels equal) is legitimate input; MONAI warns and maps it to zeros.
        warnings.filterwarnings("ignore", message="Divide by zero", category=Warning)
        out = preprocess(np.ascontiguousarray(pixels, dtype=np.float32))
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"preprocess returned {type(out).__name__}, expected a tensor")
    return out.as_subclass(torch.Tensor)


def content_box(shape: tuple[int, int], input_size: int) -> tuple[int, int, int, int]:
    """Where a slice of ``shape`` lands inside the padded square: (top, left, height, width).

    Used to crop Grad-CAM maps back to the slice's own aspect ratio before resizing to (H, W).
    """
    h, w = shape
    scale = input_size / max(h, w)
    nh = max(1, round(h * scale))
    nw = max(1, round(w * scale))
    top = (input_size - nh) // 2
    left = (input_size - nw) // 2
    return top, left, nh, nw
