"""Secondary Captures we built, as PNG for the browser: the pixels exactly as the PACS received them."""

from __future__ import annotations

import functools
import io
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.errors import InvalidDicomError

from triaged.errors import NotFoundError


@functools.lru_cache(maxsize=64)  # an output file never changes once written (stable UIDs, atomic write)
def _png(path: Path) -> bytes:
    try:
        ds = pydicom.dcmread(path)
        pixels = np.asarray(ds.pixel_array)
    except (OSError, InvalidDicomError, AttributeError, ValueError) as exc:
        raise NotFoundError(f"cannot read output image: {type(exc).__name__}") from exc
    if pixels.ndim == 2:  # monochrome: scale to 8 bits for display
        low, high = float(pixels.min()), float(pixels.max())
        pixels = ((pixels - low) / (high - low or 1.0) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def output_png(path: Path) -> bytes:
    """PNG bytes of the Secondary Capture at ``path``; :class:`NotFoundError` when it cannot be read."""
    return _png(path)
