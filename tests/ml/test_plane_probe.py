"""Slab series for the 2-D sagittal/coronal probe: the right plane, spacing and shape, and never 3-D again."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from triaged.ml.reformat import acquisition_plane, axial_reformat
from triaged.training.plane_probe import PROBE_FILE, card_lines, slab_series, slab_voxels


@pytest.mark.parametrize("plane", ["sagittal", "coronal"])
def test_slabs_lie_in_their_plane_and_average_the_voxels_they_cover(plane: str) -> None:
    z, y, x = 40, 36, 44
    volume = np.arange(z * y * x, dtype=np.float32).reshape(z, y, x)
    slices, geometry = slab_series(volume, 1.5, plane, 2)
    assert acquisition_plane(geometry.orientation) == plane
    across = x if plane == "sagittal" else y
    assert len(slices) == across // 2 == len(geometry.positions)
    assert all(s.shape == ((z, y) if plane == "sagittal" else (z, x)) for s in slices)
    first = volume[:, :, :2].mean(axis=2) if plane == "sagittal" else volume[:, :2, :].mean(axis=1)
    np.testing.assert_allclose(slices[0], first[::-1])  # superior row first, as a viewer shows it
    axis = 0 if plane == "sagittal" else 1
    steps = np.diff([p[axis] for p in geometry.positions])
    np.testing.assert_allclose(steps, 3.0)
    assert axial_reformat(slices, geometry) is None  # 3 mm slabs of 1.5 mm pixels: a 2-D series


def test_slab_thicknesses_are_at_least_two_voxels_and_distinct() -> None:
    assert slab_voxels(1.0) == [3, 4, 6]
    assert slab_voxels(2.25) == [2, 3]
    assert slab_voxels(4.0) == [2]


def test_the_card_section_names_flagged_slabs(tmp_path: Path) -> None:
    assert card_lines(tmp_path) == []
    row = {"volume": "v", "plane": "sagittal", "thickness_mm": 4.5, "slices": 30, "assessable": True}
    rows = [
        {**row, "reason": None, "urgency": 0.71, "label": "pituitary", "urgent": True},
        {**row, "plane": "coronal", "reason": None, "urgency": 0.4, "label": "notumor", "urgent": False},
    ]
    (tmp_path / "evaluation").mkdir()
    (tmp_path / "evaluation" / PROBE_FILE).write_text(json.dumps({"rows": rows}))
    text = "\n".join(card_lines(tmp_path))
    assert "| v | sagittal | 4.5 mm | 30 | 0.710 | pituitary | **yes** |" in text
    assert "1 of 2 slab series of a normal brain are flagged (top label pituitary)" in text
