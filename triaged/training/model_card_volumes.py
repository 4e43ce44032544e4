"""Model-card sections for a model evaluated on real volumes (tcga_lgg): data, labels, operating point, series
results per contrast and site, slice results per source, Grad-CAM on FLAIR masks. Every number comes from the
evaluation report."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from triaged.training.data import Sample
from triaged.training.evaluate_volumes import SERIES_TARGET_SENSITIVITY
from triaged.training.lgg import MIN_TUMOUR_PIXELS, UNSEEN_SITE
from triaged.training.mpr import is_mpr
from triaged.training.series_eval import series_rows, threshold_interval, urgent_count


def _pct(value: float) -> str:
    return "–" if math.isnan(value) else f"{value * 100:.1f} %"


def lgg_data_lines() -> list[str]:
    return [
        "- TCGA-LGG FLAIR-abnormality volumes (kaggle_3m, Buda et al. 2019; Mazurowski et al. 2017; TCIA TCGA-LGG):",
        "  80 lower-grade-glioma patients of sites DU, HT, EZ, every axial slice in pre-contrast T1, FLAIR and",
        "  post-contrast T1, co-registered, with FLAIR-abnormality masks. Non-commercial research terms (unverified",
        "  CC BY-NC-SA 4.0 on Kaggle; TCIA data usage policy).",
        f"- Split by patient and site: site {UNSEEN_SITE} never trains (half its patients calibrate, half are the",
        "  unseen-site test); DU is split 70/15/15 by patient; the single EZ patient is test. A patient is never on",
        "  two sides. The Kaggle/Cheng rows of the 1.x manifest are kept unchanged.",
        f"- Slice labels: `glioma` where the mask covers ≥ {MIN_TUMOUR_PIXELS} px of the 256² slice; smaller",
        "  non-empty masks (partial-volume slivers) and empty slices next to a lesion slice (the 5–6 mm slab may",
        "  hold lesion drawn on the neighbour only) are excluded from training and slice metrics; every other slice",
        "  is `notumor` (skull base and vertex included). Channels that are FLAIR copies are excluded.",
        "- Masks serve the attention loss on all three contrasts (co-registered), as Cheng masks do on T1 post.",
    ]


def reformat_data_lines(samples: Sequence[Sample]) -> list[str]:
    """The sagittal/coronal reformat rows of the manifest (from 2.1.0), or nothing when it has none."""
    rows = [s for s in samples if is_mpr(s) and not s.excluded]
    if not rows:
        return []
    tumour = sum(s.label != "notumor" for s in rows)
    return [
        "- Sagittal and coronal reformats of the tcga_lgg *training* patients (`python -m triaged.training.mpr`):",
        f"  {len(rows)} slabs of 4 mm every 8 mm ({tumour} glioma, {len(rows) - tumour} notumor), labelled by the",
        "  slice rule above on the reformatted mask; in-plane 0.9 mm and the slice spacing estimated from the head",
        "  (the source gives no spacings). They give both classes in both planes from the same scanners: before",
        "  them every tumour-free training image was axial and the sagittal/coronal ones nearly all tumours (Cheng).",
    ]


def threshold_stability_lines(volumes: dict[str, Any]) -> list[str]:
    """How much the operating point would move with other patients of the unseen site, and what that would do to
    test sensitivity: the rule re-run on patient resamples of the validation series it was chosen on."""
    chosen_on = [s for s in volumes["val"].get("series", []) if s.get("site") == UNSEEN_SITE]
    if not chosen_on:
        return []
    interval = threshold_interval(chosen_on, SERIES_TARGET_SENSITIVITY)
    test = volumes["test"].get("series", [])

    def test_sensitivity(threshold: float) -> str:
        return f"{urgent_count(test, threshold)}/{len(test)}"

    return [
        "",
        f"How stable that choice is: the same rule on the unseen site's {interval['patients']} validation patients "
        f"drawn again with replacement ({interval['rounds']} rounds, each patient with all its series) gives "
        f"thresholds from {interval['lo']:.3f} to {interval['hi']:.3f} ({interval['coverage'] * 100:.0f} % of rounds); "
        f"at those two thresholds {test_sensitivity(interval['lo'])} and {test_sensitivity(interval['hi'])} test "
        "tumour series would be urgent. A few dozen series of one site set it, so a site adopting the model should "
        "check it on series of its own before relying on it.",
    ]


def volume_sections(report: dict[str, Any]) -> list[str]:
    """The series table (test), the per-source table and the FLAIR pointing game, or nothing without volumes."""
    volumes = report.get("volumes")
    if not volumes:
        return []
    lines = [
        "",
        "## Real volumes: tcga_lgg series through the daemon path",
        "",
        "Each test patient's slices of one contrast are written as a DICOM MR series (FLAIR as inversion recovery,"
        " T1 as spin echo, axial geometry) and assessed as `triaged serve` would: pixel decode → metadata gate →"
        " MONAI preprocessing → model → aggregation → threshold. Every series holds a glioma, so the rate of urgent"
        " series is the series sensitivity (Wilson 95 % CI); `not_assessable` counts as missed.",
        "",
        f"Operating point: {volumes['rule']} → **{float(report['urgency_threshold']):.4f}**.",
        *threshold_stability_lines(volumes),
        "",
        "| test group | series | urgent | sensitivity [95 % CI] | not assessable | slice tumour AUC | "
        "key image on lesion | key-image pointing game |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in series_rows(volumes["test"])]
    val = volumes["val"]["groups"]
    lines += [
        "",
        "Validation series at the same threshold (the unseen site's were used to choose it): "
        + ", ".join(f"{k} {g['urgent']}/{g['series']}" for k, g in val.items() if k.startswith(("site:", "contrast:")))
        + ".",
    ]
    reasons = volumes["test"]["groups"].get("all", {}).get("not_assessable_reasons", [])
    if reasons:
        lines += ["", "Reasons for `not_assessable` on test series: " + "; ".join(reasons) + "."]
    if report.get("per_source"):
        lines += [
            "",
            "Slice level, per source, at the same threshold (seen = sources the model trained on):",
            "",
            "| source | slices | tumour slices | tumour AUC | sensitivity | specificity |",
            "|---|---|---|---|---|---|",
        ]
        for row in report["per_source"]:
            auc = row["tumour_auc"]
            lines.append(
                f"| {row['source']} | {row['slices']} | {row['tumour']} | {'–' if math.isnan(auc) else f'{auc:.4f}'} | "
                f"{_pct(row['sensitivity'])} | {_pct(row['specificity'])} |"
            )
    flair = report.get("gradcam_flair", {})
    if flair.get("n"):
        pg = flair["pointing_game"]
        lines += [
            "",
            f"Grad-CAM pointing game on {flair['n']} test FLAIR tumour slices (tcga_lgg masks, same rule as Cheng): "
            f"{pg['value'] * 100:.1f} % [{pg['ci95'][0] * 100:.1f}, {pg['ci95'][1] * 100:.1f}].",
        ]
    return lines
