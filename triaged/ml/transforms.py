"""The one preprocessing pipeline shared by training, evaluation and the daemon.

It is built from the ``preprocessing`` block of ``model.json`` so a model directory fully describes how its
inputs must look; nothing here depends on where the pixels came from (PNG/JPEG or DICOM).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

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
__all__ = [
    "PREPROCESSING_KIND",
    "PreprocessingConfig",
    "build_preprocess",
    "content_box",
    "preprocess_slice",
    "preprocess_stack",
]


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


# MONAI's ``percentile`` hands tensors larger than this to numpy (pytorch#64947); the stack path does the same.
_TORCH_QUANTILE_MAX_NUMEL = 1_000_000


def preprocess_stack(config: PreprocessingConfig, slices: Sequence[np.ndarray]) -> torch.Tensor:
    """:func:`build_preprocess` applied to every slice of a series at once: (N, 1, S, S) float32, bit-identical.

    Slice by slice, MONAI sorts each slice twice to find its two percentiles (``torch.quantile``), ~80 % of the
    preprocessing time of a series. Here slices of one shape are one array: both percentiles come from one
    ``np.partition`` per slice and are interpolated exactly as ``torch.quantile`` does, then the same MONAI
    ``Resize`` and ``SpatialPad`` run once with the slices as channels (both work channel by channel).
    """
    size = config.input_size
    out = torch.zeros((len(slices), 1, size, size), dtype=torch.float32)
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, pixels in enumerate(slices):
        if pixels.ndim != 2:
            raise ValueError(f"expected a 2-D slice, got shape {pixels.shape}")
        groups.setdefault(pixels.shape, []).append(index)
    spatial = Compose(
        [
            Resize(spatial_size=size, size_mode="longest", mode=config.interpolation, anti_aliasing=True),
            SpatialPad(spatial_size=(size, size), method="symmetric", mode="constant"),
            EnsureType(data_type="tensor", dtype=torch.float32, track_meta=False),
        ]
    )
    for indices in groups.values():
        stack = np.stack([np.asarray(slices[i], dtype=np.float32) for i in indices])
        scaled = _scale_percentiles(stack, config.lower_percentile, config.upper_percentile)
        result = spatial(scaled)
        if not isinstance(result, torch.Tensor):
            raise TypeError(f"preprocess returned {type(result).__name__}, expected a tensor")
        out[indices, 0] = result.as_subclass(torch.Tensor)
    return out


def _scale_percentiles(stack: np.ndarray, lower: float, upper: float) -> torch.Tensor:
    """MONAI ``ScaleIntensityRangePercentiles(b_min=0, b_max=1, clip=True)`` per slice of an (n, H, W) stack."""
    rows = torch.from_numpy(stack.reshape(len(stack), -1))
    low, high = _percentiles(rows, lower, upper)
    span = high - low
    flat = torch.where(span == 0, torch.ones_like(span), span)  # blank slices: MONAI maps them to zeros
    scaled = ((rows - low) / flat * 1.0 + 0.0).clamp(0.0, 1.0)
    scaled = torch.where(span == 0, rows - low + 0.0, scaled)
    return scaled.reshape(stack.shape)


def _percentiles(rows: torch.Tensor, lower: float, upper: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 1) lower and upper percentiles of each row, with the arithmetic of MONAI's ``percentile``."""
    n = rows.shape[1]
    if n > _TORCH_QUANTILE_MAX_NUMEL:
        values = np.percentile(rows.numpy(), [lower, upper], axis=1).astype(np.float32)
        return torch.from_numpy(values[0])[:, None], torch.from_numpy(values[1])[:, None]
    # torch.quantile (linear): ranks q·(n-1) in the input's dtype, then lerp between the two order statistics.
    ranks = torch.from_numpy(np.array([lower / 100.0, upper / 100.0])).to(rows.dtype) * (n - 1)
    below = ranks.long()
    above = ranks.ceil().long()
    weights = ranks - below
    kth = sorted({int(k) for k in torch.cat([below, above])})
    ordered = torch.from_numpy(np.partition(rows.numpy(), kth, axis=1))
    values = torch.lerp(ordered[:, below], ordered[:, above], weights)
    return values[:, :1], values[:, 1:]


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
