"""Classification, ranking and calibration metrics in plain numpy (checked against hand-computed toy values).

Bootstrap confidence intervals resample images with replacement; they ignore patient clustering (no patient ids
for Cheng), so they are optimistic, and the model card says so.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts ``cm[true, pred]`` as int64."""
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (y_true.astype(int), y_pred.astype(int)), 1)
    return cm


def per_class(cm: np.ndarray, classes: Sequence[str]) -> dict[str, dict[str, float]]:
    """Precision, recall (sensitivity), F1 and specificity of each class from a confusion matrix."""
    total = cm.sum()
    out: dict[str, dict[str, float]] = {}
    for i, name in enumerate(classes):
        tp = float(cm[i, i])
        fn = float(cm[i].sum() - tp)
        fp = float(cm[:, i].sum() - tp)
        tn = float(total - tp - fn - fp)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out[name] = {
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "specificity": tn / (tn + fp) if tn + fp else 0.0,
            "support": tp + fn,
        }
    return out


def roc_auc(y_binary: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic (ties count one half); NaN if one class."""
    pos = score[y_binary.astype(bool)]
    neg = score[~y_binary.astype(bool)]
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    _, inverse, counts = np.unique(np.concatenate([pos, neg]), return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0
    full = average_rank[inverse]
    u = full[: pos.size].sum() - pos.size * (pos.size + 1) / 2.0
    return float(u / (pos.size * neg.size))


def roc_curve(y_binary: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) with thresholds descending; predicted positive means ``score >= threshold``."""
    thresholds = np.unique(score)[::-1]
    pos = max(int(y_binary.sum()), 1)
    neg = max(int((1 - y_binary).sum()), 1)
    tpr = np.array([((score >= t) & (y_binary == 1)).sum() / pos for t in thresholds])
    fpr = np.array([((score >= t) & (y_binary == 0)).sum() / neg for t in thresholds])
    return np.concatenate([[0.0], fpr]), np.concatenate([[0.0], tpr]), np.concatenate([[np.inf], thresholds])


def macro_auc(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Mean one-vs-rest ROC-AUC over classes present in ``y_true``."""
    aucs = [roc_auc((y_true == c).astype(int), probs[:, c]) for c in range(probs.shape[1])]
    return float(np.nanmean(aucs))


def sens_spec(y_binary: np.ndarray, score: np.ndarray, threshold: float) -> tuple[float, float]:
    """Sensitivity and specificity of ``score >= threshold``."""
    pred = score >= threshold
    pos, neg = y_binary == 1, y_binary == 0
    sens = float(pred[pos].mean()) if pos.any() else float("nan")
    spec = float((~pred[neg]).mean()) if neg.any() else float("nan")
    return sens, spec


def youden_threshold(y_binary: np.ndarray, score: np.ndarray) -> float:
    """Threshold maximising sensitivity + specificity − 1."""
    fpr, tpr, thr = roc_curve(y_binary, score)
    best = int(np.argmax(tpr[1:] - fpr[1:])) + 1
    return float(thr[best])


def sensitivity_threshold(y_binary: np.ndarray, score: np.ndarray, target: float) -> float:
    """Highest threshold whose sensitivity is at least ``target`` (the most specific high-sensitivity point)."""
    _fpr, tpr, thr = roc_curve(y_binary, score)
    ok = np.flatnonzero(tpr[1:] >= target)
    return float(thr[1:][ok[0]]) if ok.size else float(thr[-1])


def expected_calibration_error(
    probs: np.ndarray, y_true: np.ndarray, n_bins: int = 15
) -> tuple[float, list[dict[str, float]]]:
    """Top-label ECE with equal-width confidence bins, plus the bins for a reliability diagram."""
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y_true).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ece, bins = 0.0, []
    for lo, hi in itertools.pairwise(edges):
        sel = (conf > lo) & (conf <= hi) if lo > 0 else (conf >= lo) & (conf <= hi)
        if not sel.any():
            continue
        acc, mean_conf, frac = float(correct[sel].mean()), float(conf[sel].mean()), float(sel.mean())
        ece += frac * abs(acc - mean_conf)
        bins.append(
            {"lo": float(lo), "hi": float(hi), "accuracy": acc, "confidence": mean_conf, "count": int(sel.sum())}
        )
    return float(ece), bins


def nll(logits: np.ndarray, y_true: np.ndarray, temperature: float = 1.0) -> float:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-logp[np.arange(len(y_true)), y_true].mean())


def fit_temperature(logits: np.ndarray, y_true: np.ndarray) -> float:
    """Temperature minimising validation NLL (golden-section search on log T in [0.05, 20])."""
    lo, hi = np.log(0.05), np.log(20.0)
    g = (np.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = nll(logits, y_true, float(np.exp(a))), nll(logits, y_true, float(np.exp(b)))
    for _ in range(60):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = nll(logits, y_true, float(np.exp(a)))
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = nll(logits, y_true, float(np.exp(b)))
    return float(np.exp((lo + hi) / 2))


def bootstrap_ci(
    metric: Callable[[np.ndarray], float], n: int, *, rounds: int = 1000, seed: int = 0, alpha: float = 0.05
) -> tuple[float, float]:
    """Percentile bootstrap CI of ``metric(indices)`` over ``n`` items resampled with replacement."""
    rng = np.random.default_rng(seed)
    values = [metric(rng.integers(0, n, n)) for _ in range(rounds)]
    finite = np.asarray([v for v in values if np.isfinite(v)])
    if finite.size == 0:
        return float("nan"), float("nan")
    return float(np.quantile(finite, alpha / 2)), float(np.quantile(finite, 1 - alpha / 2))


def cluster_resamples(clusters: np.ndarray, rounds: int, seed: int) -> tuple[int, Iterator[np.ndarray]]:
    """The number of distinct ``clusters`` (patients, say) and ``rounds`` bootstrap resamples of them: each a row
    index array that draws whole clusters with replacement, every row of a drawn cluster included. Rows of one
    patient are correlated, so resampling rows instead would make a CI far too narrow."""
    groups = [np.flatnonzero(clusters == c) for c in np.unique(clusters)]
    rng = np.random.default_rng(seed)

    def draws() -> Iterator[np.ndarray]:
        for _ in range(rounds):
            yield np.concatenate([groups[i] for i in rng.integers(0, len(groups), len(groups))])

    return len(groups), draws()


def with_ci(value: float, ci: tuple[float, float]) -> dict[str, Any]:
    return {"value": value, "ci95": [ci[0], ci[1]]}
