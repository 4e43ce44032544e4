"""Release criteria on the real MR DICOM series in ``../shared/data/dicom`` (evaluation only, never training).

Criteria: the normal anatomical brain series (UIH 3D T1, Siemens XA30 MPRAGE) must not be flagged urgent, and the
diffusion/EPI series must be ``not_assessable``. DICOM is read with the daemon's own decoder and
metadata mapping, so a series is judged here exactly as the pipeline would judge it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from triaged.ml.inference import Triage
from triaged.training.series_eval import read_series

RELEASE_SERIES: tuple[tuple[str, str, str], ...] = (
    ("uih_t1_gre_3d_sag", "neurolabusc_dcm_qa_uih/In/DTI_132225/t1_gre_fsp_3d_sag__132750", "not_urgent"),
    ("siemens_xa30_mprage", "neurolabusc_dcm_qa_xa30/In/6_anat-T1w_acq-tfl", "not_urgent"),
    ("toshiba_dti_b0", "neurolabusc_dcm_qa_toshiba/In/Galan/8006_DTI_AX_30d", "not_assessable"),
    ("siemens_dwi_sag_b0", "neurolabusc_dcm_qa_sag/In/6_DWI_SagAP", "not_assessable"),
    ("philips_dti_b0", "neurolabusc_dcm_qa_philips/In/Vanderbilt_2018/601_WIP_dti_ax", "not_assessable"),
    ("ge_epi_fmri", "neurolabusc_dcm_qa_nih/In/20180918GE/mr_0004", "not_assessable"),
    ("siemens_epi_mosaic", "neurolabusc_dcm_qa_ts/In/1.dcm", "not_assessable"),
)
#: Release series name → its folder under ``../shared/data/dicom`` (other checks read the same series from here).
RELEASE_PATHS: dict[str, str] = {name: path for name, path, _ in RELEASE_SERIES}


def _summary(result: Any, slices: int) -> dict[str, Any]:
    tumour = (1.0 - result.slice_probabilities[:, 2]) if result.slice_probabilities.size else np.zeros(0)
    return {
        "assessable": result.assessable,
        "reason": result.reason,
        "label": result.label,
        "urgency": result.urgency,
        "urgent": result.urgent,
        "threshold": result.threshold,
        "ood_score": result.ood_score,
        "slices": slices,
        "reformat": result.reformat,
        "assessed_slices": int(result.slice_in_brain.size),
        "in_brain": int(result.slice_in_brain.sum()),
        "slices_tumour_over_0.5": int((tumour[result.slice_in_brain] > 0.5).sum()) if tumour.size else 0,
        "max_slice_tumour_prob": float(tumour[result.slice_in_brain].max())
        if tumour.size and result.slice_in_brain.any()
        else None,
    }


def evaluate_release(triage: Triage, dicom_root: Path) -> dict[str, Any]:
    """Run the release series through ``triage``; also report what the classifier alone would say (gate bypassed)."""
    series: list[dict[str, Any]] = []
    for name, rel, expect in RELEASE_SERIES:
        slices, meta = read_series(dicom_root / rel)
        result = triage.assess(slices, meta, cam_top_k=0)
        ungated_meta = dataclasses.replace(
            meta,
            series_description="t1",
            protocol_name="t1",
            image_type=("ORIGINAL", "PRIMARY"),
            scanning_sequence=("GR",),
            diffusion_b_values=(),
            body_part_examined="",
            echo_time=None,
            repetition_time=None,
            inversion_time=None,
        )
        ungated = triage.assess(slices, ungated_meta, cam_top_k=0)
        # A normal anatomical series must be assessed (a refusal is no answer) and not urgent.
        passed = (result.assessable and not result.urgent) if expect == "not_urgent" else (not result.assessable)
        series.append(
            {
                "name": name,
                "path": rel,
                "expect": expect,
                "passed": passed,
                "series_description": meta.series_description,
                "result": _summary(result, len(slices)),
                "classifier_without_metadata_gate": _summary(ungated, len(slices)),
            }
        )
    return {"passed": all(s["passed"] for s in series), "series": series}


VOLUME_RELEASE_SENSITIVITY = 0.95


def volume_release(volumes_test: dict[str, Any]) -> dict[str, Any]:
    """Release criterion on real tumour volumes: test FLAIR and post-contrast T1 series urgent at the shipped
    threshold in at least :data:`VOLUME_RELEASE_SENSITIVITY` of patients each (refusals count as misses)."""
    rows = {}
    for contrast in ("flair", "t1_post"):
        group = volumes_test["groups"].get(f"contrast:{contrast}", {"series": 0, "urgent": 0})
        sensitivity = group["urgent"] / group["series"] if group["series"] else 0.0
        rows[contrast] = {
            "series": group["series"],
            "urgent": group["urgent"],
            "passed": group["series"] > 0 and sensitivity >= VOLUME_RELEASE_SENSITIVITY,
        }
    return {"passed": all(r["passed"] for r in rows.values()), "contrasts": rows}
