"""Metrics of one evaluation set, with bootstrap 95 % CIs, as a JSON-ready dict."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from triaged.training.metrics import (
    bootstrap_ci,
    confusion_matrix,
    expected_calibration_error,
    macro_auc,
    per_class,
    roc_auc,
    sens_spec,
    with_ci,
)


def set_report(
    probs: np.ndarray,
    labels: np.ndarray,
    classes: Sequence[str],
    thresholds: dict[str, float],
    *,
    rounds: int = 1000,
    uncalibrated: np.ndarray | None = None,
) -> dict[str, Any]:
    """Accuracy, per-class metrics, ROC-AUCs, tumour-vs-no-tumour operating points and ECE for one set."""
    n = len(labels)
    c = len(classes)
    nt = list(classes).index("notumor")
    pred = probs.argmax(1)
    cm = confusion_matrix(labels, pred, c)
    tumour_score = 1.0 - probs[:, nt]
    is_tumour = (labels != nt).astype(int)
    out: dict[str, Any] = {"n": n, "counts": {cl: int((labels == i).sum()) for i, cl in enumerate(classes)}}
    out["accuracy"] = with_ci(
        float((pred == labels).mean()), bootstrap_ci(lambda i: float((pred[i] == labels[i]).mean()), n, rounds=rounds)
    )
    out["confusion_matrix"] = cm.tolist()
    out["per_class"] = per_class(cm, classes)
    out["auc_ovr"] = {cl: _auc_with_ci((labels == i).astype(int), probs[:, i], rounds) for i, cl in enumerate(classes)}
    out["macro_auc"] = with_ci(
        macro_auc(labels, probs), bootstrap_ci(lambda i: macro_auc(labels[i], probs[i]), n, rounds=rounds)
    )
    binary: dict[str, Any] = {
        "auc": with_ci(
            roc_auc(is_tumour, tumour_score),
            bootstrap_ci(lambda i: roc_auc(is_tumour[i], tumour_score[i]), n, rounds=rounds),
        ),
    }
    for name, thr in thresholds.items():
        binary[name] = _operating_point(is_tumour, tumour_score, thr, rounds)
    out["tumour_vs_notumour"] = binary
    ece, bins = expected_calibration_error(probs, labels)
    out["ece"] = with_ci(
        ece, bootstrap_ci(lambda i: expected_calibration_error(probs[i], labels[i])[0], n, rounds=min(rounds, 300))
    )
    out["reliability"] = bins
    if uncalibrated is not None:
        ece_raw, bins_raw = expected_calibration_error(uncalibrated, labels)
        out["ece_before_scaling"] = ece_raw
        out["reliability_before_scaling"] = bins_raw
    return out


def _operating_point(is_tumour: np.ndarray, score: np.ndarray, thr: float, rounds: int) -> dict[str, Any]:
    def sens(i: np.ndarray) -> float:
        return sens_spec(is_tumour[i], score[i], thr)[0]

    def spec(i: np.ndarray) -> float:
        return sens_spec(is_tumour[i], score[i], thr)[1]

    n = len(score)
    every = np.arange(n)
    return {
        "threshold": thr,
        "sensitivity": with_ci(sens(every), bootstrap_ci(sens, n, rounds=rounds)),
        "specificity": with_ci(spec(every), bootstrap_ci(spec, n, rounds=rounds)),
    }


def _auc_with_ci(y: np.ndarray, score: np.ndarray, rounds: int) -> dict[str, Any]:
    def auc(i: np.ndarray) -> float:
        return roc_auc(y[i], score[i])

    return with_ci(roc_auc(y, score), bootstrap_ci(auc, len(y), rounds=rounds))
