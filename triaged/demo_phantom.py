"""A synthetic T1 post-contrast brain phantom drawn with numpy, and slice stacks from image folders.

The default demo study is made here, by the project itself: an ellipsoid head (scalp fat, skull, cortex,
white matter, lateral ventricles) sliced axially, optionally with a ring-enhancing "lesion" in one
hemisphere. It looks like a brain MR at viewer zoom; it is not a real scan and says nothing about
clinical performance.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
FloatImage = NDArray[np.float32]


def _ellipse(
    xx: NDArray[np.float64], yy: NDArray[np.float64], centre: tuple[float, float], radii: tuple[float, float]
) -> NDArray[np.float64]:
    """Signed radius: < 1 inside the ellipse."""
    result: NDArray[np.float64] = ((xx - centre[0]) / radii[0]) ** 2 + ((yy - centre[1]) / radii[1]) ** 2
    return result


def _smooth_noise(rng: np.random.Generator, size: int, scale: int) -> NDArray[np.float64]:
    coarse = rng.standard_normal((size // scale + 2, size // scale + 2)).astype(np.float32)
    image = Image.fromarray(coarse, mode="F").resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.float64)


def phantom_slice(z: float, *, size: int = 256, lesion: bool = False, seed: int = 0) -> FloatImage:
    """One axial slice at relative height ``z`` in [-1, 1] (0 = through the ventricles)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    shrink = float(np.sqrt(max(1.0 - z * z, 0.05)))
    cx, cy = 0.5, 0.52
    head = _ellipse(xx, yy, (cx, cy), (0.36 * shrink, 0.44 * shrink))
    skull_inner = _ellipse(xx, yy, (cx, cy), (0.33 * shrink, 0.41 * shrink))
    brain = _ellipse(xx, yy, (cx, cy), (0.315 * shrink, 0.395 * shrink))
    white = _ellipse(xx, yy, (cx, cy), (0.25 * shrink, 0.33 * shrink))
    image = np.zeros((size, size), dtype=np.float64)
    image[head < 1] = 900.0  # scalp fat: bright on T1
    image[skull_inner < 1] = 120.0  # cortical bone: dark
    cortex = (brain < 1) & (white >= 1)
    image[cortex] = 520.0
    # Gyri: modulate the cortical ribbon so it is not a perfect ring.
    angle = np.arctan2(yy - cy, xx - cx)
    folds = 0.5 + 0.5 * np.sin(angle * 23 + 3 * z)
    image[cortex] = 430.0 + 150.0 * folds[cortex]
    image[white < 1] = 680.0  # white matter: brighter than grey on T1
    if abs(z) < 0.45:
        ventricle_scale = 1.0 - abs(z) / 0.45
        for side in (-1.0, 1.0):
            radii = (0.03 * ventricle_scale + 0.005, 0.12 * ventricle_scale + 0.01)
            ventricle = _ellipse(xx, yy, (cx + side * 0.05, cy - 0.02), radii)
            image[ventricle < 1] = 180.0  # CSF: dark on T1
    falx = (np.abs(xx - cx) < 0.004) & (brain < 1) & (np.abs(yy - cy) > 0.16 * shrink)
    image[falx] = 300.0
    if lesion:
        lesion_z = 0.15
        radius = 0.085 * float(np.sqrt(max(1.0 - ((z - lesion_z) / 0.45) ** 2, 0.0)))
        if radius > 0.01:
            distance = np.sqrt((xx - 0.63) ** 2 + (yy - 0.42) ** 2)
            image[distance < radius] = 380.0  # necrotic centre
            ring = (distance >= radius * 0.65) & (distance < radius)
            image[ring] = 1150.0  # enhancing rim
            oedema = (distance >= radius) & (distance < radius * 1.6) & (brain < 1)
            image[oedema] *= 0.8
    texture = _smooth_noise(rng, size, 8) * 18.0 + rng.standard_normal((size, size)) * 12.0
    image = np.where(head < 1, image + texture, np.abs(rng.standard_normal((size, size))) * 8.0)
    return np.clip(image, 0.0, None).astype(np.float32)


def phantom_series(slices: int = 12, *, size: int = 256, lesion: bool = False, seed: int = 0) -> list[FloatImage]:
    """Axial slices from just below the ventricles to the vertex (where the demo lesion sits)."""
    heights = np.linspace(-0.35, 0.75, slices)
    return [phantom_slice(float(z), size=size, lesion=lesion, seed=seed + i) for i, z in enumerate(heights)]


def image_files(directory: Path, limit: int) -> list[Path]:
    """The first ``limit`` image files of ``directory`` in sorted order."""
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return files[:limit]


def slices_from_images(paths: Sequence[Path], size: int | None = None) -> list[FloatImage]:
    """Grayscale float slices, resized to one shape (``size`` square, or the first image's shape)."""
    arrays: list[FloatImage] = []
    shape: tuple[int, int] | None = (size, size) if size else None
    for path in paths:
        with Image.open(path) as image:
            gray = image.convert("L")
            if shape is None:
                shape = (gray.height, gray.width)
            if (gray.height, gray.width) != shape:
                gray = gray.resize((shape[1], shape[0]), Image.Resampling.BILINEAR)
            arrays.append(np.asarray(gray, dtype=np.float32))
    return arrays
