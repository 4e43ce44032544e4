"""Axial reformat of 3-D volumes: which series qualify, and that voxels land where the patient geometry says."""

from __future__ import annotations

import numpy as np
import pytest

from triaged.ml.reformat import MIN_SLICES, acquisition_plane, axial_reformat
from triaged.ml.results import SliceGeometry

SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # rows run posterior, columns run inferior (Siemens sagittal)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _sagittal_volume(
    n: int = 40, rows: int = 48, cols: int = 44, spacing: float = 1.0, pixel: float = 1.0
) -> tuple[list[np.ndarray], SliceGeometry]:
    """Slices ordered along the normal (-x, i.e. patient left to right), as the pipeline sorts them."""
    slices = [np.zeros((rows, cols), dtype=np.float32) for _ in range(n)]
    positions = tuple((float(-k * spacing), 0.0, 0.0) for k in range(n))
    return slices, SliceGeometry(orientation=SAGITTAL, positions=positions, pixel_spacing=(pixel, pixel))


def test_acquisition_plane_follows_the_slice_normal() -> None:
    assert acquisition_plane(SAGITTAL) == "sagittal"
    assert acquisition_plane(CORONAL) == "coronal"
    assert acquisition_plane(AXIAL) == "axial"
    tilted = (0.0, 0.96, -0.28, 0.0, 0.28, 0.96)  # a sagittal slab tilted 16 degrees is still sagittal
    assert acquisition_plane(tilted) == "sagittal"


def test_a_sagittal_voxel_lands_at_its_axial_position() -> None:
    """A bright voxel in the left, posterior, superior corner lands at the top axial slice, bottom row (posterior)
    and right-hand column (patient left, radiological convention)."""
    slices, geometry = _sagittal_volume()
    # slice 0 lies at x = 0, the most patient-left; row 0 is superior (column direction -z); column 43 posterior
    slices[0][0, 43] = 1000.0
    result = axial_reformat(slices, geometry)
    assert result is not None and result.source_plane == "sagittal"
    volume = np.stack(result.slices)
    assert volume.shape == (48, 44, 40)  # (z: rows of the source, y: its columns, x: its slices)
    z, y, x = np.unravel_index(int(np.argmax(volume)), volume.shape)
    assert (z, y, x) == (47, 43, 39)


def test_a_coronal_volume_reformats_too() -> None:
    n = MIN_SLICES
    slices = [np.full((30, 36), float(k), dtype=np.float32) for k in range(n)]  # value = mm posterior
    positions = tuple((0.0, float(k), 0.0) for k in range(n))  # the normal is +y: sorted anterior first
    geometry = SliceGeometry(orientation=CORONAL, positions=positions, pixel_spacing=(1.0, 1.0))
    result = axial_reformat(slices, geometry)
    assert result is not None and result.source_plane == "coronal"
    first_row = result.slices[0][0]  # anterior row of the lowest axial slice
    last_row = result.slices[0][-1]
    assert first_row.mean() == pytest.approx(0.0) and last_row.mean() == pytest.approx(n - 1)


@pytest.mark.parametrize(
    "change",
    ["axial", "thick_slices", "few_slices", "gap", "no_geometry"],
)
def test_what_is_scored_as_acquired(change: str) -> None:
    slices, geometry = _sagittal_volume()
    if change == "axial":
        geometry = SliceGeometry(AXIAL, geometry.positions, geometry.pixel_spacing)
    elif change == "thick_slices":  # 2-D sagittal: 5 mm slices on 0.5 mm pixels
        slices, geometry = _sagittal_volume(spacing=5.0, pixel=0.5)
    elif change == "few_slices":
        slices, geometry = _sagittal_volume(n=MIN_SLICES - 1)
    elif change == "gap":
        positions = list(geometry.positions)
        positions[20:] = [(p[0] - 3.0, p[1], p[2]) for p in positions[20:]]
        geometry = SliceGeometry(geometry.orientation, tuple(positions), geometry.pixel_spacing)
    assert axial_reformat(slices, None if change == "no_geometry" else geometry) is None


def test_voxels_become_cubic_at_the_coarsest_spacing() -> None:
    slices, geometry = _sagittal_volume(n=40, rows=60, cols=60, spacing=1.2, pixel=1.0)
    result = axial_reformat(slices, geometry)
    assert result is not None
    assert result.spacing_mm == pytest.approx(1.2)
    assert len(result.slices) == 50 and result.slices[0].shape == (50, 40)
