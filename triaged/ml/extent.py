"""Slices too far below the top of the brain to be brain: the neck of a whole-head volume.

Why: :func:`triaged.ml.aggregate.in_brain_mask` judges a slice by its own pixels, relative to the series' head. The
upper neck of a whole-head 3-D volume is a solid, tissue-filled cross-section about half the size of the
head, so it passes that rule. The normal Siemens XA30 MPRAGE's axial reformat (128 slices of 2 mm) admits
slices 0-112, and the neck slices 9-12, about 200 mm below its highest in-brain slice, were a skull-strip
candidate's key images (glioma 0.64): a radiologist would have been shown the cervical spine as the reason
for an urgent flag. No per-slice image measure separates them: their feature distance is in range (0.7-1.1).

How far a slice lies below another is geometry, not appearance. The adult brain reaches at most about
150 mm from the vertex to the foramen magnum: basion-bregma height (a skull measure, outer table) averages
about 135 mm in adult men and rarely exceeds 150 mm. The highest slice the in-brain rule admits already lies
below the vertex, since it needs half the series' typical head area. An in-brain slice more than
:data:`MAX_BRAIN_HEIGHT_MM` below the highest in-brain slice of its series is therefore below the posterior
fossa (about C2-C3), whatever it looks like. The limit is fixed from anatomy with a margin of 20 mm or more.
It was not fitted to any series. Where a series' top is cut off, its highest in-brain slice is lower than the
brain's top and the rule removes less, so a cut-off top can only make it more conservative.

Heights are known only for axial slices whose positions the headers give, or for an axial reformat. A
sagittal or coronal 2-D series has the neck inside each slice, and the rule does not apply to it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from triaged.ml.reformat import acquisition_plane
from triaged.ml.results import SliceGeometry

MAX_BRAIN_HEIGHT_MM = 170.0


def slice_heights_mm(shapes: Sequence[tuple[int, ...]], geometry: SliceGeometry | None) -> np.ndarray | None:
    """Height of each slice's centre in the patient (LPS z, mm, superior positive), or None where unknown.

    Only slices closer to axial than to any other plane get heights. The centre is used, not the stored
    position: the position is the first pixel's corner, which on a tilted slice lies tens of mm above or
    below the slice's middle. ``shapes`` are the slices' (rows, columns), in the order of the positions.
    """
    if geometry is None or not shapes or len(geometry.orientation) != 6 or len(geometry.positions) != len(shapes):
        return None
    if acquisition_plane(geometry.orientation) != "axial":
        return None
    row_dir = np.asarray(geometry.orientation[:3], dtype=np.float64)
    col_dir = np.asarray(geometry.orientation[3:6], dtype=np.float64)
    between_rows, between_columns = geometry.pixel_spacing
    heights = []
    for shape, position in zip(shapes, geometry.positions, strict=True):
        rows, columns = shape[0], shape[1]
        centre = (
            np.asarray(position, dtype=np.float64)
            + row_dir * (columns - 1) / 2 * between_columns
            + col_dir * (rows - 1) / 2 * between_rows
        )
        heights.append(centre[2])
    return np.asarray(heights, dtype=np.float64)


def below_brain(in_brain: np.ndarray, heights_mm: np.ndarray | None, max_height_mm: float | None) -> np.ndarray:
    """In-brain slices more than ``max_height_mm`` below the series' highest in-brain slice.

    Returns all False where heights are unknown, the limit is not set (models from before the rule), or no slice
    is in the brain.
    """
    if heights_mm is None or max_height_mm is None or not in_brain.any():
        return np.zeros(in_brain.shape, dtype=bool)
    if heights_mm.shape != in_brain.shape:
        raise ValueError(f"{heights_mm.size} slice heights for {in_brain.size} slices")
    top = float(heights_mm[in_brain].max())
    below: np.ndarray = in_brain & (heights_mm < top - float(max_height_mm))
    return below
