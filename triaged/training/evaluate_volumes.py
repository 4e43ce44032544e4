"""The parts of ``triaged evaluate`` that need real volumes: the operating point chosen on a site the model never
trained on, series-level results per contrast and site, a per-source slice table, and Grad-CAM on FLAIR masks.

Why the threshold comes from here: a threshold fitted on slices of the training sources measures how confident the
model is on data it has seen (1.2.0's 0.994). The series of the held-out site (:data:`~triaged.training.lgg.
UNSEEN_SITE`, validation half) are the nearest thing to the next hospital that we can measure before release.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from triaged.ml.inference import Predictor, Triage
from triaged.training.camscore import evenly_spaced, load_masks, score_cams
from triaged.training.data import Sample
from triaged.training.lgg import UNSEEN_SITE, is_lgg, lgg_contrast, lgg_mask_path, lgg_site, trained_sites
from triaged.training.metrics import roc_auc, sens_spec
from triaged.training.series_eval import (
    choose_threshold,
    evaluate_volumes,
    series_report,
    volume_series,
)

SERIES_TARGET_SENSITIVITY = 0.95


def slice_source(sample: Sample, seen: frozenset[str]) -> str:
    """Source of a slice for the per-source table: kaggle, cheng, or tcga_lgg by site (seen = trained on)."""
    if not is_lgg(sample):
        return sample.source
    site = lgg_site(sample.path)
    return f"tcga_lgg:{site} ({'seen site' if site in seen else 'unseen site'})"


def per_source_table(
    samples: Sequence[Sample], probs: np.ndarray, classes: Sequence[str], threshold: float, seen: frozenset[str]
) -> list[dict[str, Any]]:
    """Slice-level tumour AUC and sensitivity/specificity at the series threshold, for each source (and contrast of
    tcga_lgg): how far sensitivity moves from the sources the model trained on to the one it did not."""
    nt = list(classes).index("notumor")
    tumour = 1.0 - probs[:, nt]
    truth = np.array([s.label != "notumor" for s in samples], dtype=int)
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        source = slice_source(s, seen)
        groups.setdefault(source, []).append(i)
        if is_lgg(s):
            groups.setdefault(f"{source} {lgg_contrast(s.path)}", []).append(i)
    rows = []
    for key in sorted(groups):
        idx = np.array(groups[key])
        y, score = truth[idx], tumour[idx]
        sens, spec = sens_spec(y, score, threshold)
        rows.append(
            {
                "source": key,
                "slices": int(idx.size),
                "tumour": int(y.sum()),
                "tumour_auc": roc_auc(y, score),  # NaN where the group has one class only
                "sensitivity": sens if y.sum() else float("nan"),
                "specificity": spec if y.sum() < y.size else float("nan"),
            }
        )
    return rows


def flair_tumour_rows(samples: Sequence[Sample], limit: int) -> list[int]:
    """Up to ``limit`` evenly spaced indices of the tcga_lgg FLAIR tumour slices of ``samples``."""
    return evenly_spaced(
        [i for i, s in enumerate(samples) if is_lgg(s) and lgg_contrast(s.path) == "flair" and s.label != "notumor"],
        limit,
    )


def flair_masks(data_root: Path, samples: Sequence[Sample], rows: Sequence[int], size: int) -> np.ndarray:
    """The FLAIR-abnormality masks of those slices at the model's input size."""
    return load_masks([lgg_mask_path(data_root, samples[i].path) for i in rows], size)


def flair_pointing_game(
    predictor: Predictor,
    data_root: Path,
    samples: Sequence[Sample],
    images: np.ndarray,
    labels: np.ndarray,
    *,
    limit: int,
    rounds: int,
) -> dict[str, Any]:
    """Grad-CAM pointing game on tcga_lgg FLAIR tumour slices against their FLAIR-abnormality masks."""
    rows = flair_tumour_rows(samples, limit)
    if not rows:
        return {"n": 0}
    masks = flair_masks(data_root, samples, rows, predictor.spec.preprocessing.input_size)
    c = predictor.cam_config
    report, _ = score_cams(
        predictor.model,
        torch.from_numpy(images[rows].astype(np.float32)),
        labels[rows].tolist(),
        masks,
        c.target_layer,
        method=c.method,
        atrous=c.atrous,
        rounds=rounds,
    )
    return report


def volume_evaluation(
    triage: Triage, data_root: Path, samples: Sequence[Sample], *, choose: bool, threshold: float
) -> tuple[float, dict[str, Any]]:
    """Assess the validation and test volumes through the daemon path; with ``choose``, set the urgency threshold
    on the unseen site's validation series (all contrasts, refusals count as misses). Returns (threshold, report)."""
    val = evaluate_volumes(triage, data_root, volume_series(samples, "val"))
    unseen = [o for o in val if o.site == UNSEEN_SITE]
    if choose:
        if not unseen:
            raise ValueError(f"no validation series of the unseen site {UNSEEN_SITE}; cannot choose a threshold")
        threshold = choose_threshold(unseen, SERIES_TARGET_SENSITIVITY)
    test = evaluate_volumes(triage, data_root, volume_series(samples, "test"))
    return threshold, {
        "rule": (
            f"urgency threshold = highest value keeping {SERIES_TARGET_SENSITIVITY:.0%} of the {len(unseen)} "
            f"validation series of site {UNSEEN_SITE} (never trained on) urgent"
            if choose
            else "threshold as shipped in model.json"
        ),
        "val": series_report(val, threshold, trained_sites(samples)),
        "test": series_report(test, threshold, trained_sites(samples)),
    }
