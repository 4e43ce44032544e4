"""Sagittal and coronal reformats of the tcga_lgg volumes: geometry, orientation, the slab-label rule, the split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from triaged.training.data import Sample
from triaged.training.lgg import lgg_samples
from triaged.training.mpr import (
    DATASET,
    PIXEL_MM,
    build,
    estimated_slice_spacing_mm,
    link_data_root,
    mask_path_of,
    mpr_contrast,
    mpr_plane,
    reformat,
    with_mpr,
)
from triaged.training.mpr_eval import markdown_table, plane_metrics

SPACING_MM = 4.5


def _head(depth: int = 20) -> np.ndarray:
    """An ellipsoidal 'head' of grey level 100 in a (Z, 256, 256) stack, superior first."""
    z, y, x = np.mgrid[0:depth, 0:256, 0:256].astype(np.float32)
    inside = ((z - depth / 2) / (depth / 2)) ** 2 + ((y - 128) / 100) ** 2 + ((x - 128) / 80) ** 2 <= 1.0
    head: np.ndarray = (inside * 100.0).astype(np.float32)
    return head


def _lesion(depth: int = 20) -> np.ndarray:
    """A 30 × 30 px lesion over slices 8-11, columns 100-129 (patient right of midline), rows 80-109."""
    mask = np.zeros((depth, 256, 256), dtype=np.float32)
    mask[8:12, 80:110, 100:130] = 1.0
    return mask


def test_slabs_through_the_lesion_are_tumour_their_neighbours_excluded_the_rest_no_tumour() -> None:
    slabs = list(reformat(_head(), _lesion(), SPACING_MM))
    sagittal = [s for s in slabs if s.plane == "sagittal"]
    assert {s.label for s in sagittal if not s.exclude_reason} == {"glioma", "notumor"}
    step = round(8.0 / PIXEL_MM)
    for s in sagittal:
        start = s.index * step
        columns = set(range(start, start + round(4.0 / PIXEL_MM)))
        through = bool(columns & set(range(100, 130)))
        if through:
            assert (s.label, s.exclude_reason) == ("glioma", ""), s.index
        elif s.label == "notumor" and not s.exclude_reason:
            # no lesion within one step of a slab labelled no tumour
            assert not set(range(start - step, start + len(columns) + step)) & set(range(100, 130)), s.index
    assert any(s.exclude_reason == "next_to_lesion" for s in sagittal)
    # the slab's own mask marks where the lesion is: anterior-posterior rows 80-109 → image columns 80-109
    tumour = next(s for s in sagittal if s.label == "glioma" and not s.exclude_reason)
    cols = np.flatnonzero(tumour.mask.any(axis=0))
    assert cols.min() == 80 and cols.max() == 109


def test_a_slab_is_a_cubic_pixel_image_superior_at_the_top_anterior_and_patient_right_on_the_left() -> None:
    volume = _head()
    volume[0:2, 63:67, 126:130] = 255.0  # a marker: superior (first slices), anterior (low rows), at the midline
    slabs = {(s.plane, s.index): s for s in reformat(volume, np.zeros_like(volume), SPACING_MM)}
    step = round(8.0 / PIXEL_MM)
    sag = slabs[("sagittal", 128 // step)]
    assert sag.image.shape == (round(20 * SPACING_MM / PIXEL_MM), 256)  # rows: superior → inferior, 0.9 mm
    rows, cols = np.nonzero(sag.image > 150)
    assert rows.max() < sag.image.shape[0] * 0.15 and cols.mean() < 96  # top, anterior (left)
    cor = slabs[("coronal", 63 // step)]
    rows, cols = np.nonzero(cor.image > 150)
    assert rows.max() < cor.image.shape[0] * 0.15 and 120 <= cols.mean() <= 136  # top, centred left-right
    assert all(s.image.dtype == np.uint8 for s in slabs.values())


def test_lateral_slabs_with_little_tissue_are_skipped() -> None:
    sagittal = [s.index for s in reformat(_head(), _lesion(), SPACING_MM) if s.plane == "sagittal"]
    step = round(8.0 / PIXEL_MM)
    # the head spans columns 48-208; its outermost columns hold less than 40 % of the midline's tissue
    assert min(sagittal) * step > 48 and max(sagittal) * step < 208


def test_the_slice_spacing_is_estimated_from_the_head_length() -> None:
    # head rows 28-228 (201 px at 0.9 mm), 20 slices → 0.72 × 180.9 mm / 20
    assert estimated_slice_spacing_mm(_head(20)) == pytest.approx(0.72 * 201 * PIXEL_MM / 20, rel=0.02)
    assert estimated_slice_spacing_mm(_head(400)) == 1.0  # clamped


def _row(path: str, split: str, label: str = "notumor") -> Sample:
    return Sample(path, "tcga_lgg_mpr", label, split, "lgg:" + path.split("/")[1], False, "", False, False)


def test_paths_name_plane_contrast_and_mask() -> None:
    path = f"{DATASET}/TCGA_DU_0001/sagittal_t1_post/004.png"
    assert (mpr_plane(path), mpr_contrast(path)) == ("sagittal", "t1_post")
    assert mask_path_of(path) == f"{DATASET}/TCGA_DU_0001/sagittal_mask/004.png"


def test_only_training_reformats_join_the_manifest() -> None:
    base = [Sample("kaggle_4class/a.jpg", "kaggle", "glioma", "val", "g", False, "", False, False)]
    mpr = [_row(f"{DATASET}/TCGA_DU_1/sagittal_flair/001.png", s) for s in ("train", "val", "test")]
    assert [s.split for s in with_mpr(base, mpr)] == ["val", "train"]


def test_plane_metrics_separate_planes_and_sites() -> None:
    samples, scores = [], []
    for site, plane, good in (("HT", "sagittal", True), ("HT", "coronal", False), ("DU", "sagittal", True)):
        for i, label in enumerate(["glioma"] * 5 + ["notumor"] * 5):
            samples.append(_row(f"{DATASET}/TCGA_{site}_{i}/{plane}_flair/001.png", "val", label))
            scores.append((0.9 if label == "glioma" else 0.1) if good else 0.5)
    p_tumour = np.array(scores)
    probs = np.stack([p_tumour, np.zeros_like(p_tumour), 1 - p_tumour, np.zeros_like(p_tumour)], axis=1)
    metrics = plane_metrics(samples, probs)
    assert metrics["sagittal_unseen_auc"] == 1.0 and metrics["sagittal_seen_auc"] == 1.0
    assert metrics["coronal_unseen_auc"] == 0.5 and metrics["coronal_seen_auc"] is None
    assert "| shipped | 1.000 | 1.000 | – | 0.500 | – | – |" in markdown_table([{"model": "shipped", **metrics}])


def test_the_shared_volumes_reformat_with_each_patient_on_one_side(tmp_path: Path) -> None:
    from tests.conftest import shared_data

    data_root = shared_data()
    axial = {s.group: s.split for s in lgg_samples(data_root)}
    patients = ["TCGA_DU_7018", "TCGA_HT_7877"]  # a complete patient, and one whose T1 channels are FLAIR copies
    rows = build(data_root, tmp_path, patients)
    assert {r.group for r in rows} == {f"lgg:{p}" for p in patients}
    assert all(r.split == axial[r.group] for r in rows)
    assert {mpr_contrast(r.path) for r in rows if "HT_7877" in r.path} == {"flair"}
    assert {r.label for r in rows if not r.excluded} == {"glioma", "notumor"}
    for r in rows[:: max(1, len(rows) // 10)]:
        with Image.open(tmp_path / r.path) as img:
            assert img.mode == "L" and img.width == 256 and 100 <= img.height <= 256
        if r.label == "glioma":
            assert (tmp_path / mask_path_of(r.path)).is_file()
    link_data_root(data_root, tmp_path)
    assert (tmp_path / "tcga_lgg" / "index.csv").is_file()
