"""Series-level specificity on tumour-free stretches of real volumes (evaluation only).

The shared data hold no normal MR volume beyond two release series, so the threshold's cost in false alarms
is otherwise unmeasured at series level. Every tcga_lgg patient has slices far from the lesion: the longest
run of consecutive tumour-free slices (no mask, not a neighbour of a lesion slice, not excluded) of each
validation/test volume is written as its own DICOM series and assessed through the daemon's path. These are
glioma patients, so a run may still show mass effect or oedema outside the FLAIR mask: the number is a lower
bound on specificity for normal brains of the same scanners, not a replacement for normal volumes.

Usage: ``python -m triaged.training.specificity MODEL_DIR [--data-root ../shared/data] [--json OUT]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from triaged.ml.inference import Triage
from triaged.training.data import Sample, read_manifest
from triaged.training.series_eval import (
    VolumeSeries,
    assess_dicom_files,
    volume_series,
    wilson_interval,
    write_volume_series,
)

MIN_RUN_SLICES = 8  # fewer slices are not a series a radiologist would read


def longest_tumour_free_run(samples: Sequence[Sample]) -> tuple[int, int]:
    """(start, length) of the longest run of consecutive usable no-tumour slices; (0, 0) when there is none."""
    best_start, best_length, start, length = 0, 0, 0, 0
    for index, sample in enumerate(samples):
        if not sample.excluded and sample.label == "notumor":
            start = index if length == 0 else start
            length += 1
            if length > best_length:
                best_start, best_length = start, length
        else:
            length = 0
    return best_start, best_length


def tumour_free_series(
    samples: Sequence[Sample], split: str, *, min_slices: int = MIN_RUN_SLICES
) -> list[VolumeSeries]:
    """The longest tumour-free run of every real volume of ``split``, where it has at least ``min_slices``."""
    runs = []
    for volume in volume_series(samples, split):
        start, length = longest_tumour_free_run(volume.samples)
        if length >= min_slices:
            runs.append(dataclasses.replace(volume, samples=volume.samples[start : start + length]))
    return runs


def specificity_report(triage: Triage, data_root: Path, runs: Sequence[VolumeSeries]) -> dict[str, Any]:
    """Per contrast: runs assessed, flagged urgent, not assessable, specificity with a Wilson 95 % CI."""
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="triaged-specificity-") as tmp:
        for run in tqdm(runs, desc="tumour-free runs", unit="series"):
            paths = write_volume_series(data_root, run, Path(tmp) / run.patient / run.contrast)
            result = assess_dicom_files(triage, paths, cam_top_k=0)
            rows.append(
                {
                    "patient": run.patient,
                    "site": run.site,
                    "split": run.split,
                    "contrast": run.contrast,
                    "slices": len(run.samples),
                    "assessable": result.assessable,
                    "urgency": result.urgency,
                    "urgent": result.urgent,
                    "label": result.label,
                }
            )
    report: dict[str, Any] = {"threshold": triage.threshold, "series": rows, "contrasts": {}}
    for contrast in sorted({r["contrast"] for r in rows}):
        group = [r for r in rows if r["contrast"] == contrast]
        assessed = [r for r in group if r["assessable"]]
        quiet = sum(1 for r in assessed if not r["urgent"])
        low, high = wilson_interval(quiet, len(assessed))
        report["contrasts"][contrast] = {
            "series": len(group),
            "assessed": len(assessed),
            "urgent": len(assessed) - quiet,
            "specificity": quiet / len(assessed) if assessed else None,
            "ci95": [low, high],
        }
    return report


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    parser.add_argument("--splits", default="val,test", help="comma-separated manifest splits")
    parser.add_argument("--json", type=Path, default=None, help="write the full report here")
    args = parser.parse_args(argv)
    if not (args.model_dir / "manifest.csv").is_file():
        parser.error(f"{args.model_dir} has no manifest.csv")
    if not (args.data_root / "tcga_lgg").is_dir():
        parser.error(f"{args.data_root} has no tcga_lgg folder")
    samples = read_manifest(args.model_dir / "manifest.csv")
    runs = [run for split in args.splits.split(",") for run in tumour_free_series(samples, split)]
    report = specificity_report(Triage(args.model_dir), args.data_root, runs)
    for contrast, row in report["contrasts"].items():
        spec = row["specificity"]
        shown = "–" if spec is None else f"{spec:.1%} [{row['ci95'][0]:.1%}, {row['ci95'][1]:.1%}]"
        print(f"{contrast}: {row['urgent']} of {row['assessed']} tumour-free runs urgent; specificity {shown}")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
