"""Sagittal and coronal slab images reformatted from the tcga_lgg axial volumes (``tcga_lgg_mpr`` training rows).

Why: every tumour-free training image the model has is axial, while its sagittal and coronal training images are
nearly all tumours (Cheng). So a normal 2-D sagittal or coronal series can be read as a tumour: the plane probe
found the 4 mm slabs of a normal MPRAGE flagged in both planes (the midline sella read as pituitary). These volumes
give both classes in both planes from the same patients and scanners, so plane is no shortcut to a label.

How an image is made (one patient, one contrast, deterministic):

- the axial JPEGs are stacked (slice 1 is the skull base, so the stack is flipped to put superior at the top);
- the source resampled every slice to 256 px and does not give spacings. In-plane pixels are taken as
  :data:`PIXEL_MM` (the raw series checked by the data README had 0.9 mm pixels); the slice spacing is estimated
  from the head: the stack is assumed to span :data:`HEAD_HEIGHT_PER_LENGTH` of the head's front-to-back length
  (skull base to vertex of an adult head), clamped to 1–7.5 mm. A wrong estimate stretches the image a little,
  which the training zoom augmentation already covers;
- the stack is resampled to cubic pixels and averaged over :data:`SLAB_MM` in the through-plane direction
  (a thick 2-D slice), one slab every :data:`STEP_MM`; slabs with less than :data:`MIN_TISSUE_SHARE` of the
  plane's largest tissue area (scalp and air beside the head) are skipped.

Labels follow the axial rule of :func:`triaged.training.lgg.slice_label`, applied to the slab: ``glioma`` where the mask
covers at least ``MIN_TUMOUR_PIXELS`` pixels of the slab, *excluded* (``tiny_mask``) below that but not empty,
*excluded* (``next_to_lesion``) where the slab is empty but abnormality lies within one step of it, ``notumor``
otherwise. Channels that are FLAIR copies are skipped. A row has the patient's own split, so a patient is never
on two sides; :func:`with_mpr` adds only the training rows to a manifest (the others serve :func:`plane_auc`).

Usage: ``python -m triaged.training.mpr --out DERIVED --base MANIFEST --manifest-out MANIFEST2``. The reformats
are written under ``DERIVED/tcga_lgg_mpr/`` and ``DERIVED`` is made a data root (links to the shared datasets
beside them), so training reads ``--data-root DERIVED`` with no other change.
"""

from __future__ import annotations

import argparse
import os
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from PIL import Image
from tqdm import tqdm

from triaged.training.data import Sample
from triaged.training.lgg import (
    CONTRASTS,
    LggSlice,
    lgg_samples,
    read_index,
    slice_label,
)

DATASET = "tcga_lgg_mpr"
SOURCE = "tcga_lgg_mpr"
PLANES = ("sagittal", "coronal")
PIXEL_MM = 0.9
HEAD_HEIGHT_PER_LENGTH = 0.72
SPACING_RANGE_MM = (1.0, 7.5)
SLAB_MM = 4.0
STEP_MM = 8.0
MIN_TISSUE_SHARE = 0.4
TISSUE_FRACTION_OF_P99 = 0.1


@dataclass(frozen=True)
class Slab:
    """One reformatted slab: its image (uint8), mask (bool) and label by the module's rule."""

    plane: str
    index: int
    image: np.ndarray
    mask: np.ndarray
    label: str
    exclude_reason: str


def _read_stack(data_root: Path, paths: Sequence[str], *, binary: bool = False) -> np.ndarray:
    """(Z, 256, 256) float32, superior first (the source's slice 1 is the skull base)."""
    planes = []
    for p in paths:
        with Image.open(data_root / p) as img:
            a = np.asarray(img.convert("L"), dtype=np.float32)
        planes.append((a > 127).astype(np.float32) if binary else a)
    return np.stack(planes[::-1])


def estimated_slice_spacing_mm(volume: np.ndarray) -> float:
    """Slice spacing such that the stack spans :data:`HEAD_HEIGHT_PER_LENGTH` of the head's front-to-back length."""
    tissue = volume > TISSUE_FRACTION_OF_P99 * np.percentile(volume, 99)
    rows = np.flatnonzero(tissue.any(axis=(0, 2)))
    length_mm = (rows[-1] - rows[0] + 1) * PIXEL_MM if rows.size else volume.shape[1] * PIXEL_MM
    spacing = HEAD_HEIGHT_PER_LENGTH * length_mm / volume.shape[0]
    return float(np.clip(spacing, *SPACING_RANGE_MM))


def to_cubic(volume: np.ndarray, spacing_mm: float) -> np.ndarray:
    """Resample the slice axis to :data:`PIXEL_MM` (trilinear, as a reformat in a viewer would)."""
    depth = max(2, round(volume.shape[0] * spacing_mm / PIXEL_MM))
    t = torch.from_numpy(np.ascontiguousarray(volume))[None, None]
    out = F.interpolate(t, size=(depth, volume.shape[1], volume.shape[2]), mode="trilinear", align_corners=False)
    resampled: np.ndarray = out[0, 0].numpy()
    return resampled


def _plane_view(volume: np.ndarray, plane: str) -> np.ndarray:
    """(position, rows, cols) with the through-plane axis first: sagittal runs right→left with anterior on the
    image's left; coronal runs anterior→posterior with the patient's right on the image's left (radiological)."""
    if plane == "sagittal":
        return np.transpose(volume, (2, 0, 1))
    if plane == "coronal":
        return np.transpose(volume, (1, 0, 2))
    raise ValueError(f"unknown plane {plane!r}")


def reformat(image_volume: np.ndarray, mask_volume: np.ndarray, spacing_mm: float) -> Iterator[Slab]:
    """Every kept slab of both planes of one co-registered image/mask pair (see the module docstring)."""
    image, mask = to_cubic(image_volume, spacing_mm), to_cubic(mask_volume, spacing_mm) >= 0.5
    slab, step = max(1, round(SLAB_MM / PIXEL_MM)), max(1, round(STEP_MM / PIXEL_MM))
    threshold = TISSUE_FRACTION_OF_P99 * np.percentile(image, 99)
    for plane in PLANES:
        img_view, mask_view = _plane_view(image, plane), _plane_view(mask, plane)
        lesion_at: np.ndarray = np.asarray(mask_view.any(axis=(1, 2)))
        starts = list(range(0, img_view.shape[0] - slab + 1, step))
        slabs = [img_view[s : s + slab].mean(axis=0) for s in starts]
        tissue = [int((a > threshold).sum()) for a in slabs]
        most = max(tissue, default=0)
        for index, (start, a, area) in enumerate(zip(starts, slabs, tissue, strict=True)):
            if most == 0 or area < MIN_TISSUE_SHARE * most:
                continue
            m = mask_view[start : start + slab].mean(axis=0) >= 0.5
            near = lesion_at[max(0, start - step) : start + slab + step].any()
            label, reason = slice_label(int(m.sum()), bool(near))  # the axial rule, on the slab
            yield Slab(plane, index, np.clip(np.rint(a), 0, 255).astype(np.uint8), m, label, reason)


def image_path(patient: str, plane: str, contrast: str, index: int) -> str:
    return f"{DATASET}/{patient}/{plane}_{contrast}/{index:03d}.png"


def mask_path_of(path: str) -> str:
    """``tcga_lgg_mpr/P/sagittal_flair/004.png`` → ``tcga_lgg_mpr/P/sagittal_mask/004.png``."""
    parts = path.split("/")
    return "/".join([parts[0], parts[1], parts[2].split("_", 1)[0] + "_mask", parts[3]])


def is_mpr(sample: Sample) -> bool:
    return sample.source == SOURCE


def mpr_plane(path: str) -> str:
    return path.split("/")[2].split("_", 1)[0]


def mpr_contrast(path: str) -> str:
    return path.split("/")[2].split("_", 1)[1]


def _write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)


def build(data_root: Path, out_root: Path, patients: Sequence[str] | None = None) -> list[Sample]:
    """Write the slabs of every patient (or of ``patients``), all contrasts that are not FLAIR copies, and return
    their rows."""
    rows = read_index(data_root)
    split_of = {s.group: s.split for s in lgg_samples(data_root)}
    by_volume: dict[tuple[str, str], list[LggSlice]] = defaultdict(list)
    for r in rows:
        by_volume[(r.patient, r.contrast)].append(r)
    samples: list[Sample] = []
    for patient in tqdm(sorted(patients or {r.patient for r in rows}), desc="reformat", mininterval=5.0):
        ordered = {c: sorted(by_volume[(patient, c)], key=lambda r: r.slice_number) for c in CONTRASTS}
        volumes = {
            c: _read_stack(data_root, [r.path for r in rs])
            for c, rs in ordered.items()
            if rs and not any(r.duplicated for r in rs)
        }
        mask = _read_stack(data_root, [r.mask_path for r in ordered["flair"]], binary=True)
        spacing = estimated_slice_spacing_mm(volumes["flair"])  # FLAIR is never a copy: every patient has it
        masks_written: set[str] = set()
        for contrast, volume in volumes.items():
            for slab in reformat(volume, mask, spacing):
                path = image_path(patient, slab.plane, contrast, slab.index)
                _write_png(out_root / path, slab.image)
                if slab.label != "notumor" and mask_path_of(path) not in masks_written:
                    _write_png(out_root / mask_path_of(path), (slab.mask * 255).astype(np.uint8))
                    masks_written.add(mask_path_of(path))
                group = f"lgg:{patient}"
                reason = slab.exclude_reason
                samples.append(
                    Sample(path, SOURCE, slab.label, split_of[group], group, bool(reason), reason, False, False)
                )
    return samples


def link_data_root(data_root: Path, out_root: Path) -> None:
    """Make ``out_root`` a data root: a link to each shared dataset beside the reformats."""
    for entry in sorted(data_root.iterdir()):
        link = out_root / entry.name
        if entry.is_dir() and not link.exists():
            link.symlink_to(entry.resolve(), target_is_directory=True)


def with_mpr(base: Sequence[Sample], mpr: Sequence[Sample]) -> list[Sample]:
    """A manifest plus the reformats' *training* rows (validation and test stay axial, comparable across models)."""
    return [s for s in base if not is_mpr(s)] + [s for s in mpr if s.split == "train"]


def main(argv: Sequence[str] | None = None) -> None:
    from triaged.training.data import read_manifest, split_summary, write_manifest

    p = argparse.ArgumentParser(prog="python -m triaged.training.mpr", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", type=Path, default=Path(__file__).resolve().parents[3] / "shared" / "data")
    p.add_argument("--out", type=Path, required=True, help="derived data root to write the reformats into")
    p.add_argument("--base", type=Path, help="manifest to extend with the reformats' training rows")
    p.add_argument("--manifest-out", type=Path, help="where to write the extended manifest (with --base)")
    ns = p.parse_args(argv)
    if not (ns.data_root / "tcga_lgg" / "index.csv").is_file():
        p.error(f"{ns.data_root / 'tcga_lgg'} has no index.csv: the reformats need the shared tcga_lgg volumes")
    if (ns.base is None) != (ns.manifest_out is None):
        p.error("--base and --manifest-out go together")
    ns.out.mkdir(parents=True, exist_ok=True)
    samples = build(ns.data_root, ns.out)
    write_manifest(samples, ns.out / DATASET / "index.csv")
    link_data_root(ns.data_root, ns.out)
    print(f"{ns.out / DATASET}: {len(samples)} slabs")
    for split, counts in split_summary(samples).items():
        print(f"  {split}: {counts}")
    if ns.base is not None and ns.manifest_out is not None:
        digest = write_manifest(with_mpr(read_manifest(ns.base), samples), ns.manifest_out)
        print(f"{ns.manifest_out}: sha256 {digest}")


if __name__ == "__main__":
    main()
