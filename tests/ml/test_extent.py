"""The below-the-brain rule: slice heights from the headers, and in-brain slices too far below the brain's top."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from triaged.ml.extent import MAX_BRAIN_HEIGHT_MM, below_brain, slice_heights_mm
from triaged.ml.inference import Triage
from triaged.ml.reformat import Reformat
from triaged.ml.results import SeriesMeta, SliceGeometry

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)


def _axial(n: int, spacing: float, orientation: tuple[float, ...] = AXIAL) -> SliceGeometry:
    normal = np.cross(orientation[:3], orientation[3:])
    positions = tuple(tuple(float(v) for v in k * spacing * normal) for k in range(n))
    return SliceGeometry(orientation=orientation, positions=positions, pixel_spacing=(1.0, 1.0))


def test_heights_are_the_slice_centres_along_the_patient_axis() -> None:
    heights = slice_heights_mm([(64, 64)] * 5, _axial(5, 4.0))
    assert heights is not None
    np.testing.assert_allclose(heights, [0.0, 4.0, 8.0, 12.0, 16.0])


def test_a_tilted_slice_is_placed_by_its_centre_not_its_corner() -> None:
    """Tilted 20 degrees about the patient x axis: the first pixel lies 100 px * sin(20) = 34 mm away in z from the
    slice's middle row, so the corner would put the slice 17 mm too high or low."""
    angle = np.deg2rad(20.0)
    orientation = (1.0, 0.0, 0.0, 0.0, float(np.cos(angle)), float(np.sin(angle)))
    geometry = SliceGeometry(orientation=orientation, positions=((0.0, 0.0, 0.0),), pixel_spacing=(1.0, 1.0))
    heights = slice_heights_mm([(101, 101)], geometry)
    assert heights is not None
    assert heights[0] == pytest.approx(50.0 * np.sin(angle))


@pytest.mark.parametrize("case", ["sagittal", "no_geometry", "count_mismatch", "no_slices"])
def test_heights_are_unknown_where_the_headers_do_not_give_them(case: str) -> None:
    shapes = [(64, 64)] * 5
    geometry: SliceGeometry | None = _axial(5, 4.0)
    if case == "sagittal":
        geometry = _axial(5, 4.0, SAGITTAL)
    elif case == "no_geometry":
        geometry = None
    elif case == "count_mismatch":
        shapes = shapes[:4]
    else:
        shapes, geometry = [], SliceGeometry(AXIAL, (), (1.0, 1.0))
    assert slice_heights_mm(shapes, geometry) is None


def test_in_brain_slices_more_than_the_limit_below_the_top_are_below_the_brain() -> None:
    heights = np.arange(0.0, 221.0, 5.0)  # 45 slices over 220 mm
    in_brain = np.ones(heights.size, dtype=bool)
    in_brain[-3:] = False  # the vertex slices are not brain: the top is the highest *in-brain* slice (205 mm)
    below = below_brain(in_brain, heights, MAX_BRAIN_HEIGHT_MM)
    assert np.flatnonzero(below).tolist() == list(range(7))  # 0..30 mm: more than 170 mm below 205 mm
    assert not (below & ~in_brain).any()


def test_a_series_shorter_than_a_brain_loses_nothing() -> None:
    """A series whose top is cut off (or that covers only the brain) is never trimmed: the rule measures from the
    highest slice it has, so a missing top can only make it keep more."""
    heights = np.arange(0.0, 166.0, 5.0)
    in_brain = np.ones(heights.size, dtype=bool)
    assert not below_brain(in_brain, heights, MAX_BRAIN_HEIGHT_MM).any()


def test_nothing_is_below_the_brain_without_heights_a_limit_or_brain() -> None:
    heights = np.arange(0.0, 400.0, 5.0)
    in_brain = np.ones(heights.size, dtype=bool)
    assert not below_brain(in_brain, None, MAX_BRAIN_HEIGHT_MM).any()
    assert not below_brain(in_brain, heights, None).any()
    assert not below_brain(np.zeros(heights.size, dtype=bool), heights, MAX_BRAIN_HEIGHT_MM).any()
    with pytest.raises(ValueError, match="slice heights"):
        below_brain(in_brain[:-1], heights, MAX_BRAIN_HEIGHT_MM)


def test_a_reformat_knows_its_slice_heights() -> None:
    reformat = Reformat(
        slices=tuple(np.zeros((4, 4), np.float32) for _ in range(3)), source_plane="sagittal", spacing_mm=2.0
    )
    np.testing.assert_allclose(reformat.heights_mm, [0.0, 2.0, 4.0])


def _head_slices(n: int, size: int = 64) -> list[np.ndarray]:
    """Identical textured discs: every slice passes the image-based in-brain rule, so only geometry can drop one."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size * 0.4) ** 2) * 400.0
    return [(disc + rng.normal(0, 20, disc.shape) * (disc > 0)).astype(np.float32) for _ in range(n)]


def _meta(geometry: SliceGeometry | None, n: int) -> SeriesMeta:
    return SeriesMeta(
        modality="MR",
        body_part_examined="BRAIN",
        series_description="AX T1",
        protocol_name="AX T1",
        image_type=("ORIGINAL", "PRIMARY"),
        scanning_sequence=("SE",),
        sequence_variant=("NONE",),
        diffusion_b_values=(),
        number_of_slices=n,
        geometry=geometry,
    )


def test_the_daemon_path_never_counts_or_shows_a_slice_below_the_brain(random_model_dir: Path) -> None:
    """45 axial slices 5 mm apart that all look like brain: the lowest ones (more than 170 mm below the top one)
    are not in the brain, so they neither score the series nor become key images."""
    slices = _head_slices(45)
    triage = Triage(random_model_dir, device="cpu", precision="fp32", threads=1)
    result = triage.assess(slices, _meta(_axial(45, 5.0), 45), cam_top_k=0)
    assert result.assessable, result.reason
    excluded = int(np.ceil((220.0 - MAX_BRAIN_HEIGHT_MM) / 5.0))  # heights 0..45 mm lie more than 170 mm below 220
    assert not result.slice_in_brain[:excluded].any()
    assert result.slice_in_brain[excluded:].all()
    assert min(result.key_slice_indices) >= excluded
    # the same slices with no positions (or a sagittal stack) are all counted: no invented geometry
    unplaced = triage.assess(slices, _meta(None, 45), cam_top_k=0)
    assert unplaced.slice_in_brain.all()


def test_a_model_from_before_the_rule_keeps_every_slice(random_model_dir: Path, tmp_path: Path) -> None:
    """Models whose model.json has no ``max_brain_height_mm`` (1.2.0) score as they were evaluated."""
    older = tmp_path / "older"
    shutil.copytree(random_model_dir, older)
    spec = json.loads((older / "model.json").read_text())
    del spec["aggregation"]["max_brain_height_mm"]
    (older / "model.json").write_text(json.dumps(spec))
    slices = _head_slices(45)
    result = Triage(older, device="cpu", precision="fp32", threads=1).assess(slices, _meta(_axial(45, 5.0), 45))
    assert result.slice_in_brain.all()
