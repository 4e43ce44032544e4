"""Skull-stripped tcga_lgg test volumes as series through the daemon path (evaluation only).

Slice AUC on stripped slices (:mod:`triaged.training.strip_eval`) says how much a stripped image confuses the
model; a radiologist gets a series decision. Public glioma volumes (BraTS-style) usually arrive skull-stripped,
so this runs every test volume (FLAIR, pre- and post-contrast T1) as such a series: the volume is written as its DICOM
series (:func:`triaged.training.series_eval.write_volume_series`), decoded as the daemon decodes it, each slice
stripped (:func:`triaged.training.skullstrip.skull_strip`), and assessed with the series' own geometry: metadata
gate, in-brain rule, OOD check, aggregation and threshold. Sensitivity per contrast next to the same volumes
unstripped; ``not_assessable`` counts as missed.

Usage: ``python -m triaged.training.strip_series MODEL_DIR [--data-root ../shared/data]``; writes
``MODEL_DIR/evaluation/strip_series.json``, which the model card reads.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from triaged.ml.inference import Triage
from triaged.ml.results import SeriesAssessment
from triaged.training.data import read_manifest
from triaged.training.series_eval import VolumeSeries, read_series, volume_series, wilson_interval, write_volume_series
from triaged.training.skullstrip import skull_strip

SERIES_FILE = "strip_series.json"


def _row(volume: VolumeSeries, stripped: SeriesAssessment, unstripped: SeriesAssessment) -> dict[str, Any]:
    return {
        "patient": volume.patient,
        "site": volume.site,
        "contrast": volume.contrast,
        "slices": len(volume.samples),
        "assessable": stripped.assessable,
        "reason": stripped.reason,
        "urgency": stripped.urgency,
        "urgent": stripped.urgent,
        "label": stripped.label,
        "unstripped_urgency": unstripped.urgency,
        "unstripped_urgent": unstripped.urgent,
    }


def assess_stripped(triage: Triage, data_root: Path, volumes: Sequence[VolumeSeries]) -> list[dict[str, Any]]:
    """One row per volume: the stripped series' decision, and the unstripped one's for comparison."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="triaged-strip-series-") as tmp:
        for volume in tqdm(volumes, desc="stripped series", unit="series"):
            files = write_volume_series(data_root, volume, Path(tmp) / volume.patient / volume.contrast)
            slices, meta = read_series(files, strict=True)
            stripped = [skull_strip(torch.from_numpy(np.asarray(s, dtype=np.float32))).numpy() for s in slices]
            rows.append(
                _row(volume, triage.assess(stripped, meta, cam_top_k=0), triage.assess(slices, meta, cam_top_k=0))
            )
    return rows


def summary(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per contrast (and all): series, urgent stripped and unstripped, not assessable, Wilson 95 % CI."""
    groups = {"all": list(rows)} | {
        c: [r for r in rows if r["contrast"] == c] for c in sorted({r["contrast"] for r in rows})
    }
    out = {}
    for name, group in groups.items():
        urgent = sum(1 for r in group if r["urgent"])
        out[name] = {
            "series": len(group),
            "urgent": urgent,
            "ci95": list(wilson_interval(urgent, len(group))),
            "not_assessable": sum(1 for r in group if not r["assessable"]),
            "unstripped_urgent": sum(1 for r in group if r["unstripped_urgent"]),
        }
    return out


def card_lines(model_dir: Path) -> list[str]:
    """The model-card lines, or nothing when this evaluation was not run for the model."""
    path = model_dir / "evaluation" / SERIES_FILE
    if not path.is_file():
        return []
    report = json.loads(path.read_text())
    lines = [
        "",
        "### Skull-stripped test series through the daemon path",
        "",
        "`python -m triaged.training.strip_series MODEL_DIR`: every tcga_lgg test volume (FLAIR, pre- and",
        "post-contrast T1) written as its DICOM series, each decoded slice stripped the same crude way as the",
        "slices above, assessed with the series'",
        f"geometry at the threshold {float(report['threshold']):.4f}; not assessable counts as missed.",
        "",
        "| contrast | series | urgent, stripped | sensitivity [95 % CI] | not assessable | urgent, unstripped |",
        "|---|---|---|---|---|---|",
    ]
    for name, g in report["groups"].items():
        low, high = g["ci95"]
        lines.append(
            f"| {name} | {g['series']} | {g['urgent']} | {g['urgent'] / g['series'] * 100:.1f} % "
            f"[{low * 100:.1f}, {high * 100:.1f}] | {g['not_assessable']} | {g['unstripped_urgent']} |"
        )
    reasons = sorted({str(r["reason"]).split(" (")[0] for r in report["series"] if not r["assessable"]})
    if reasons:
        lines += ["", "Reasons for `not_assessable` on stripped series: " + "; ".join(reasons) + "."]
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m triaged.training.strip_series", description=__doc__)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--data-root", type=Path, default=Path(__file__).resolve().parents[3] / "shared" / "data")
    parser.add_argument("--contrasts", default="flair,t1_post,t1_pre", help="comma-separated tcga_lgg contrasts")
    ns = parser.parse_args(argv)
    if not (ns.model_dir / "manifest.csv").is_file():
        parser.error(f"{ns.model_dir} is not a model directory (no manifest.csv)")
    if not (ns.data_root / "tcga_lgg").is_dir():
        parser.error(f"{ns.data_root} has no tcga_lgg folder")
    contrasts = set(ns.contrasts.split(","))
    volumes = [
        v for v in volume_series(read_manifest(ns.model_dir / "manifest.csv"), "test") if v.contrast in contrasts
    ]
    triage = Triage(ns.model_dir)
    rows = assess_stripped(triage, ns.data_root, volumes)
    groups = summary(rows)
    report = {"threshold": triage.threshold, "groups": groups, "series": rows}
    out = ns.model_dir / "evaluation" / SERIES_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    for name, g in groups.items():
        print(f"{name}: {g['urgent']}/{g['series']} urgent stripped ({g['unstripped_urgent']} unstripped)")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
