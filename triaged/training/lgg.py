"""TCGA-LGG volumes (``tcga_lgg/``) in the manifest: slice labels from the FLAIR masks, patients split by site.

Why by site: the release threshold and the temperature must be chosen on data from a scanner population the model
never trained on, or they are fitted to the training sources' look (that is how 1.2.0's 0.994 came about). So one
whole site (HT) never trains: half of its patients calibrate (``val``), the other half are the unseen-site test. The
other large site (DU) is split by patient into train / val / test, which gives the seen-site test to compare with.
A patient is never on two sides.

Slice labels (the rule is stated in the model card):

- ``glioma`` where the FLAIR-abnormality mask covers at least :data:`MIN_TUMOUR_PIXELS` of the 256 × 256 slice;
- *excluded* (``tiny_mask``) where the mask is smaller than that but not empty: a sliver of a few pixels is the
  lesion's partial-volume edge, visible to a reader on the neighbouring slice, not on this one — training it as
  tumour teaches noise and training it as no tumour teaches the model to ignore lesions;
- *excluded* (``next_to_lesion``) where the mask is empty but the slice above or below has abnormality: with
  5–6 mm slices the slab can hold lesion the annotator drew on the neighbour only;
- ``notumor`` otherwise (including skull-base and vertex slices: the model must learn that face and skull are not
  tumour, while the daemon's brain gate keeps them from being key images).

Contrasts whose channel is a FLAIR copy (``duplicated_channel``) are excluded: they are not the contrast they claim.
"""

from __future__ import annotations

import csv
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from triaged.training.data import Sample

DATASET = "tcga_lgg"
SOURCE = "tcga_lgg"
CONTRASTS = ("t1_pre", "flair", "t1_post")
MIN_TUMOUR_PIXELS = 64
UNSEEN_SITE = "HT"
SPLIT_SEED = 20300
SEEN_SITE_FRACTIONS = (0.70, 0.15, 0.15)


@dataclass(frozen=True)
class LggSlice:
    """One row of ``tcga_lgg/index.csv`` as the split and the series builder need it."""

    patient: str
    site: str
    slice_number: int
    contrast: str
    path: str
    mask_path: str
    tumour_pixels: int
    duplicated: bool


def read_index(data_root: Path) -> list[LggSlice]:
    """Every JPEG of the dataset (all contrasts), in index order."""
    rows: list[LggSlice] = []
    with (data_root / DATASET / "index.csv").open(newline="") as fh:
        for r in csv.DictReader(fh):
            rows.append(
                LggSlice(
                    patient=r["patient"],
                    site=r["site"],
                    slice_number=int(r["slice"]),
                    contrast=r["contrast"],
                    path=f"{DATASET}/{r['path']}",
                    mask_path=f"{DATASET}/{r['mask_path']}",
                    tumour_pixels=int(r["tumour_pixels"]),
                    # The row of a copied channel carries the finding ("t1_post=flair (...)"); others are empty.
                    duplicated=bool(r["duplicated_channel"].strip()),
                )
            )
    return rows


def slice_label(tumour_pixels: int, neighbour_has_tumour: bool) -> tuple[str, str]:
    """(label, exclude_reason) of one slice position by the rule in the module docstring."""
    if tumour_pixels >= MIN_TUMOUR_PIXELS:
        return "glioma", ""
    if tumour_pixels > 0:
        return "glioma", "tiny_mask"
    if neighbour_has_tumour:
        return "notumor", "next_to_lesion"
    return "notumor", ""


def patient_splits(patients_by_site: dict[str, Sequence[str]], *, seed: int = SPLIT_SEED) -> dict[str, str]:
    """Patient → split: the unseen site half val / half test, every other site by patient 70/15/15 (at least one
    test patient per site, so the smallest site is tested rather than trained on)."""
    out: dict[str, str] = {}
    rng = random.Random(seed)
    for site in sorted(patients_by_site):
        patients = sorted(patients_by_site[site])
        rng.shuffle(patients)
        n = len(patients)
        if site == UNSEEN_SITE:
            n_val = n // 2
            out.update({p: ("val" if i < n_val else "test") for i, p in enumerate(patients)})
            continue
        n_test = max(1, round(n * SEEN_SITE_FRACTIONS[2]))
        n_val = round(n * SEEN_SITE_FRACTIONS[1]) if n - n_test > 1 else 0
        for i, p in enumerate(patients):
            out[p] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return out


def lgg_samples(data_root: Path, *, seed: int = SPLIT_SEED) -> list[Sample]:
    """Every tcga_lgg JPEG as a manifest :class:`Sample` (group = patient), labelled and split as above."""
    rows = read_index(data_root)
    by_site: dict[str, set[str]] = defaultdict(set)
    tumour_at: dict[tuple[str, int], int] = {}
    for r in rows:
        by_site[r.site].add(r.patient)
        tumour_at[(r.patient, r.slice_number)] = r.tumour_pixels
    splits = patient_splits({s: sorted(p) for s, p in by_site.items()}, seed=seed)
    samples = []
    for r in rows:
        neighbour = any(tumour_at.get((r.patient, r.slice_number + d), 0) > 0 for d in (-1, 1))
        label, reason = slice_label(r.tumour_pixels, neighbour)
        if r.duplicated:
            reason = "duplicated_channel"
        samples.append(
            Sample(r.path, SOURCE, label, splits[r.patient], f"lgg:{r.patient}", bool(reason), reason, False, False)
        )
    return samples


def trained_sites(samples: Sequence[Sample]) -> frozenset[str]:
    """Sites with at least one training slice: the "seen" sites of every report (EZ's only patient is test)."""
    return frozenset(lgg_site(s.path) for s in samples if is_lgg(s) and s.split == "train" and not s.excluded)


def is_lgg(sample: Sample) -> bool:
    return sample.source == SOURCE


def lgg_patient(path: str) -> str:
    """``tcga_lgg/TCGA_DU_5849/flair/001.jpg`` → ``TCGA_DU_5849``."""
    return path.split("/")[1]


def lgg_site(path: str) -> str:
    return lgg_patient(path).split("_")[1]


def lgg_contrast(path: str) -> str:
    return path.split("/")[2]


def lgg_slice_number(path: str) -> int:
    return int(Path(path).stem)


def lgg_mask_path(data_root: Path, path: str) -> Path:
    """The FLAIR-abnormality mask of a slice (the contrasts are co-registered, so it serves all three)."""
    parts = path.split("/")
    return data_root / "/".join([parts[0], parts[1], "mask", Path(parts[3]).with_suffix(".png").name])


def with_lgg(base: Sequence[Sample], data_root: Path) -> list[Sample]:
    """The Kaggle/Cheng manifest unchanged, plus every tcga_lgg slice (replacing any tcga_lgg rows it had)."""
    return [s for s in base if not is_lgg(s)] + lgg_samples(data_root)


def main(argv: Sequence[str] | None = None) -> None:
    """Write a manifest: an existing Kaggle/Cheng manifest plus every tcga_lgg slice (``--base`` unchanged)."""
    import argparse

    from triaged.training.data import read_manifest, split_summary, write_manifest

    p = argparse.ArgumentParser(prog="python -m triaged.training.lgg", description=main.__doc__)
    p.add_argument("--base", type=Path, required=True, help="manifest.csv whose Kaggle/Cheng rows are kept as they are")
    p.add_argument("--data-root", type=Path, default=Path(__file__).resolve().parents[3] / "shared" / "data")
    p.add_argument("--out", type=Path, required=True)
    ns = p.parse_args(argv)
    samples = with_lgg(read_manifest(ns.base), ns.data_root)
    digest = write_manifest(samples, ns.out)
    print(f"{ns.out}: {len(samples)} rows, sha256 {digest}")
    for split, counts in split_summary(samples).items():
        print(f"  {split}: {counts}")


if __name__ == "__main__":
    main()
