"""2-D sagittal and coronal specificity, probed with thick-slab series cut from normal 3-D volumes (evaluation only).

Every tumour-free image the model trained on is axial; its sagittal and coronal images are nearly all tumours
(Cheng). A near-isotropic 3-D volume is scored on its axial reformat (:mod:`triaged.ml.reformat`), but a 2-D
sagittal or coronal series (4-6 mm slices, in almost every brain protocol) cannot be reformatted and is scored
as acquired. The shared data hold no such normal series, so this probe makes them: each normal 3-D release
volume is reformatted to axial (cubic voxels), then averaged into slabs about 3, 4.5 and 6 mm thick (at least
two voxels, so that the slab series is not near-isotropic and reformatted back) in the sagittal and coronal
planes, as a 2-D acquisition of that thickness would integrate them. Every slab series is assessed by the
daemon's model path (gate, in-brain rule, OOD, aggregation, threshold) on its pixels and geometry. Slabs from
one volume are not independent series: the probe shows whether the failure exists and near which thickness,
not a specificity rate.

Usage: ``python -m triaged.training.plane_probe MODEL_DIR [--data-root ../shared/data]``; writes
``MODEL_DIR/evaluation/plane_probe.json``, which the model card reads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from triaged.ml.inference import Triage
from triaged.ml.reformat import axial_reformat
from triaged.ml.results import SliceGeometry
from triaged.training.release import RELEASE_PATHS
from triaged.training.series_eval import read_series

PROBE_FILE = "plane_probe.json"
SLAB_MM = (3.0, 4.5, 6.0)  # typical 2-D slice thicknesses; at least two voxels, or the slabs would be 3-D again
# Normal 3-D volumes of the release set (``../shared/data/dicom``) that the axial reformat accepts.
NORMAL_VOLUMES = {"xa30_mprage": RELEASE_PATHS["siemens_xa30_mprage"]}
# ImageOrientationPatient of each plane as scanners write it (LPS): rows then columns.
ORIENTATION = {"sagittal": (0.0, 1.0, 0.0, 0.0, 0.0, -1.0), "coronal": (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)}


def slab_voxels(spacing_mm: float) -> list[int]:
    """Slab thicknesses in voxels for :data:`SLAB_MM`: two voxels at least, each thickness once."""
    return sorted({max(2, round(mm / spacing_mm)) for mm in SLAB_MM})


def slab_series(
    volume: np.ndarray, spacing_mm: float, plane: str, voxels: int
) -> tuple[list[np.ndarray], SliceGeometry]:
    """Slabs ``voxels`` thick through an axial-ordered volume (z inferior→superior, y anterior→posterior,
    x right→left, cubic ``spacing_mm`` voxels), each shown superior-up as a viewer shows that plane."""
    axis = {"sagittal": 2, "coronal": 1}[plane]
    count = volume.shape[axis] // voxels
    slices = [
        np.ascontiguousarray(np.take(volume, range(i * voxels, (i + 1) * voxels), axis=axis).mean(axis=axis)[::-1])
        for i in range(count)
    ]
    step = voxels * spacing_mm
    positions = tuple((i * step, 0.0, 0.0) if plane == "sagittal" else (0.0, i * step, 0.0) for i in range(count))
    return slices, SliceGeometry(ORIENTATION[plane], positions, (spacing_mm, spacing_mm))


def probe(triage: Triage, data_root: Path, volumes: dict[str, str] = NORMAL_VOLUMES) -> list[dict[str, Any]]:
    """One row per volume, plane and slab thickness: what the daemon's model path decides for that series."""
    rows = []
    for name, relative in volumes.items():
        slices, meta = read_series(data_root / "dicom" / relative)
        reformat = axial_reformat(slices, meta.geometry)
        if reformat is None:
            raise ValueError(f"{relative} is not a near-isotropic 3-D volume: it cannot be cut into slabs")
        volume = np.stack(reformat.slices)
        for plane in ORIENTATION:
            for voxels in slab_voxels(reformat.spacing_mm):
                slabs, geometry = slab_series(volume, reformat.spacing_mm, plane, voxels)
                result = triage.assess(slabs, dataclasses.replace(meta, geometry=geometry), cam_top_k=0)
                rows.append(
                    {
                        "volume": name,
                        "plane": plane,
                        "thickness_mm": round(voxels * reformat.spacing_mm, 2),
                        "slices": len(slabs),
                        "assessable": result.assessable,
                        "reason": result.reason,
                        "urgency": result.urgency,
                        "label": result.label,
                        "urgent": result.urgent,
                        "threshold": result.threshold,
                        "reformatted": result.reformat is not None,
                    }
                )
    return rows


def card_lines(model_dir: Path) -> list[str]:
    """The model-card section, or nothing when the probe has not been run for this model."""
    path = model_dir / "evaluation" / PROBE_FILE
    if not path.is_file():
        return []
    rows: list[dict[str, Any]] = json.loads(path.read_text())["rows"]
    lines = [
        "",
        "## 2-D sagittal and coronal series (probe)",
        "",
        "`python -m triaged.training.plane_probe MODEL_DIR`: slab series cut from the normal 3-D release volume",
        "(see the module docstring), assessed on the daemon's model path. One volume, so this shows whether",
        "thick-slice sagittal or coronal normals can be flagged, not how often.",
        "",
        "| volume | plane | slab | slices | urgency | top label | urgent |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        urgency = "–" if r["urgency"] is None else f"{r['urgency']:.3f}"
        verdict = ("**yes**" if r["urgent"] else "no") if r["assessable"] else f"not assessable ({r['reason']})"
        lines.append(
            f"| {r['volume']} | {r['plane']} | {r['thickness_mm']:.1f} mm | {r['slices']} | {urgency} | "
            f"{r['label'] or '–'} | {verdict} |"
        )
    flagged = [r for r in rows if r["urgent"]]
    lines.append("")
    if flagged:
        labels = sorted({str(r["label"]) for r in flagged})
        lines.append(
            f"- {len(flagged)} of {len(rows)} slab series of a normal brain are flagged (top label "
            f"{', '.join(labels)}): 2-D sagittal and coronal normals can be false alarms at this operating "
            "point (urgencies against the threshold in the table; the notes under Model compare models)."
        )
    else:
        lines.append(f"- None of the {len(rows)} slab series of a normal brain is flagged.")
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m triaged.training.plane_probe", description=__doc__)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--data-root", type=Path, default=Path(__file__).resolve().parents[3] / "shared" / "data")
    ns = parser.parse_args(argv)
    if not (ns.data_root / "dicom").is_dir():
        parser.error(f"{ns.data_root / 'dicom'} does not exist: the probe needs the shared release series")
    if not (ns.model_dir / "model.json").is_file():
        parser.error(f"{ns.model_dir} is not a model directory (no model.json)")
    rows = probe(Triage(ns.model_dir, device="cpu"), ns.data_root)
    out = ns.model_dir / "evaluation" / PROBE_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    for r in rows:
        print(
            f"{r['volume']} {r['plane']:8s} {r['thickness_mm']:4.1f} mm  urgency {r['urgency']}  urgent {r['urgent']}"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
