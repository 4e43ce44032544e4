"""Reformat a near-isotropic 3-D volume acquired sagittally or coronally into axial slices before scoring.

Why: every no-tumour image the model learned from is axial (Br35H and the tcga_lgg volumes), while its
sagittal and coronal images are nearly all tumours (Cheng's T1 post-contrast slices in every plane). Shown a
normal 3-D MPRAGE in its acquired sagittal plane, it reads the midline sella as a pituitary tumour and the
tangential cuts through the temporal lobe as glioma; the same volume reformatted to axial is read as a
normal brain. A 3-D volume holds the same information in every plane, so scoring its axial reformat costs
nothing clinically. A 2-D series with thick sagittal slices cannot be reformatted without inventing the
missing resolution; it is scored as acquired.

This module works on numbers only (no DICOM): the pipeline fills :class:`SliceGeometry` from the headers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional

from triaged.ml.results import SliceGeometry

PLANES = ("sagittal", "coronal", "axial")  # the patient axis (x, y, z) the slice normal points along
MAX_ANISOTROPY = 1.5  # largest / smallest voxel edge for a volume to count as 3-D
MIN_SLICES = 32  # fewer slices are a 2-D series, whatever their spacing
MAX_SPACING_DEVIATION = 0.1  # of the median slice spacing: a gap or an overlap is not one volume


@dataclass(frozen=True)
class Reformat:
    """The axial slices of a reformatted volume, inferior first, with where they came from."""

    slices: tuple[np.ndarray, ...]
    source_plane: str
    spacing_mm: float

    @property
    def heights_mm(self) -> np.ndarray:
        """Each slice's height above the lowest one (mm): the slices are inferior first, ``spacing_mm`` apart."""
        return np.arange(len(self.slices), dtype=np.float64) * self.spacing_mm

    @property
    def description(self) -> str:
        return f"axial reformat of a 3-D {self.source_plane} acquisition ({self.spacing_mm:.1f} mm voxels)"


def acquisition_plane(orientation: Sequence[float]) -> str:
    """The plane a slice lies in, by the patient axis its normal is closest to."""
    normal = np.cross(np.asarray(orientation[:3], dtype=np.float64), np.asarray(orientation[3:6], dtype=np.float64))
    return PLANES[int(np.argmax(np.abs(normal)))]


def _slice_spacing(geometry: SliceGeometry, normal: np.ndarray) -> float | None:
    """The uniform distance between neighbouring slices along ``normal``, or None if the slices are not evenly
    stacked in the given order (gaps, overlaps, repeats)."""
    along = np.asarray([float(np.dot(normal, p)) for p in geometry.positions])
    steps = np.diff(along)
    if steps.size == 0:
        return None
    median = float(np.median(steps))
    if median <= 0 or np.max(np.abs(steps - median)) > MAX_SPACING_DEVIATION * median:
        return None
    return median


def axial_reformat(slices: Sequence[np.ndarray], geometry: SliceGeometry | None) -> Reformat | None:
    """Axial slices resampled from a near-isotropic sagittal or coronal volume; None for anything else.

    ``slices`` are in the order of ``geometry.positions`` (the pipeline sorts along the normal). Axes are
    mapped to the nearest patient axis (an oblique slab of a few degrees is treated as orthogonal, which a
    classifier does not notice) and resampled to cubic voxels of the coarsest spacing, so no resolution is
    invented. Rows run anterior to posterior and columns patient right to left, as radiologists view axial.
    """
    if geometry is None or len(slices) < MIN_SLICES or len(geometry.positions) != len(slices):
        return None
    if len(geometry.orientation) != 6 or len({s.shape for s in slices}) != 1:
        return None
    plane = acquisition_plane(geometry.orientation)
    if plane == "axial":
        return None
    row_dir = np.asarray(geometry.orientation[:3], dtype=np.float64)
    col_dir = np.asarray(geometry.orientation[3:6], dtype=np.float64)
    normal = np.cross(row_dir, col_dir)
    spacing = _slice_spacing(geometry, normal)
    if spacing is None:
        return None
    # Volume axes: 0 = slice (along normal), 1 = image row (moves along col_dir), 2 = column (along row_dir).
    directions = (normal, col_dir, row_dir)
    voxel = (spacing, float(geometry.pixel_spacing[0]), float(geometry.pixel_spacing[1]))
    if min(voxel) <= 0 or max(voxel) / min(voxel) > MAX_ANISOTROPY:
        return None
    patient_axis = [int(np.argmax(np.abs(d))) for d in directions]
    if sorted(patient_axis) != [0, 1, 2]:
        return None
    # Target axes (z, y, x): inferior to superior, anterior to posterior, patient right to left (LPS +x = left).
    order = [patient_axis.index(2), patient_axis.index(1), patient_axis.index(0)]
    volume = np.stack([np.asarray(s, dtype=np.float32) for s in slices]).transpose(order)
    flips = [axis for axis, source in enumerate(order) if directions[source][patient_axis[source]] < 0]
    if flips:
        volume = np.flip(volume, axis=tuple(flips))
    target = max(voxel)
    size = [max(1, round(volume.shape[axis] * voxel[source] / target)) for axis, source in enumerate(order)]
    tensor = torch.from_numpy(np.ascontiguousarray(volume))[None, None]
    resampled = functional.interpolate(tensor, size=size, mode="trilinear", align_corners=False)[0, 0].numpy()
    return Reformat(
        slices=tuple(np.ascontiguousarray(a, dtype=np.float32) for a in resampled),
        source_plane=plane,
        spacing_mm=target,
    )
