"""Metrics against values computed by hand on toy examples."""

from __future__ import annotations

import numpy as np
import pytest

from triaged.training.metrics import (
    bootstrap_ci,
    confusion_matrix,
    expected_calibration_error,
    fit_temperature,
    macro_auc,
    nll,
    per_class,
    roc_auc,
    sens_spec,
    sensitivity_threshold,
    youden_threshold,
)


def test_confusion_and_per_class() -> None:
    y = np.array([0, 0, 1, 1, 1, 2])
    p = np.array([0, 1, 1, 1, 2, 2])
    cm = confusion_matrix(y, p, 3)
    assert cm.tolist() == [[1, 1, 0], [0, 2, 1], [0, 0, 1]]
    m = per_class(cm, ["a", "b", "c"])
    # class b: tp 2, fn 1, fp 1, tn 2
    assert m["b"]["precision"] == pytest.approx(2 / 3)
    assert m["b"]["recall"] == pytest.approx(2 / 3)
    assert m["b"]["f1"] == pytest.approx(2 / 3)
    assert m["b"]["specificity"] == pytest.approx(2 / 3)
    # class c: tp 1, fp 1, fn 0, tn 4
    assert m["c"]["precision"] == pytest.approx(0.5)
    assert m["c"]["recall"] == 1.0
    assert m["c"]["specificity"] == pytest.approx(4 / 5)


def test_roc_auc_with_ties() -> None:
    # pairs (pos, neg): (0.9,0.5)=1 (0.9,0.1)=1 (0.5,0.5)=0.5 (0.5,0.1)=1 -> 3.5/4
    assert roc_auc(np.array([1, 1, 0, 0]), np.array([0.9, 0.5, 0.5, 0.1])) == pytest.approx(0.875)
    assert roc_auc(np.array([1, 0]), np.array([0.2, 0.8])) == 0.0
    assert np.isnan(roc_auc(np.array([1, 1]), np.array([0.2, 0.8])))


def test_macro_auc_perfect_and_sens_spec() -> None:
    y = np.array([0, 1, 2, 2])
    probs = np.eye(3)[y] * 0.9 + 0.1 / 3
    assert macro_auc(y, probs) == pytest.approx(1.0)
    sens, spec = sens_spec(np.array([1, 1, 1, 0, 0]), np.array([0.9, 0.6, 0.2, 0.7, 0.1]), 0.5)
    assert sens == pytest.approx(2 / 3)
    assert spec == pytest.approx(1 / 2)


def test_thresholds() -> None:
    y = np.array([1, 1, 1, 0, 0, 0])
    s = np.array([0.9, 0.8, 0.3, 0.4, 0.35, 0.1])
    assert youden_threshold(y, s) == pytest.approx(0.8)  # J = 2/3 + 1 - 1; at 0.3: 1 + 1/3 - 1
    assert sensitivity_threshold(y, s, 1.0) == pytest.approx(0.3)


def test_ece_by_hand() -> None:
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    y = np.array([0, 1, 0, 0])
    ece, bins = expected_calibration_error(probs, y, n_bins=10)
    # bin (0.8, 0.9]: conf 0.9, acc 0.5 -> 0.4 * 0.5; bin (0.5, 0.6]: conf 0.6, acc 1.0 -> 0.4 * 0.5
    assert ece == pytest.approx(0.4)
    assert sum(b["count"] for b in bins) == 4


def test_temperature_recovers_known_scale() -> None:
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 2, (4000, 3))
    p = np.exp(true_logits) / np.exp(true_logits).sum(1, keepdims=True)
    y = np.array([rng.choice(3, p=row) for row in p])
    t = fit_temperature(true_logits * 3.0, y)  # over-confident by a factor of 3
    assert t == pytest.approx(3.0, rel=0.1)
    assert nll(true_logits * 3.0, y, t) < nll(true_logits * 3.0, y, 1.0)


def test_bootstrap_ci_brackets_the_mean() -> None:
    x = np.arange(100, dtype=float)
    lo, hi = bootstrap_ci(lambda i: float(x[i].mean()), 100, rounds=200, seed=1)
    assert lo < 49.5 < hi


def test_cluster_resamples_draw_whole_clusters_with_replacement() -> None:
    from triaged.training.metrics import cluster_resamples

    clusters = np.array(["a", "b", "a", "c", "b", "a"])
    count, draws = cluster_resamples(clusters, rounds=50, seed=1)
    picks = list(draws)
    assert count == 3 and len(picks) == 50
    sizes = {"a": 3, "b": 2, "c": 1}
    for pick in picks:
        drawn = clusters[pick]
        for name, size in sizes.items():
            assert (drawn == name).sum() % size == 0  # a drawn cluster comes with all its rows
    assert any(len(set(clusters[p])) < 3 for p in picks)  # with replacement: some draws miss a cluster
