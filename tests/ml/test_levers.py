"""The lever study's parts: balanced sampling, scanner augmentation, the step-budget schedule, the metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.ml.test_train import TINY
from triaged.ml.registry import load_model
from triaged.training.augment import RandJpegRecompress, build_train_augment
from triaged.training.data import Sample
from triaged.training.levers import (
    arms,
    markdown_table,
    paired_unseen_delta,
    sensitivity_at_specificity,
    validation_metrics,
)
from triaged.training.sampling import balanced_weights, effective_class_counts, sampling_group
from triaged.training.train import TrainConfig, train


def _sample(path: str, source: str, label: str = "glioma") -> Sample:
    return Sample(path, source, label, "train", path, False, "", False, False)


def _lgg(patient: str, site: str, contrast: str, n: int, label: str) -> Sample:
    return _sample(f"tcga_lgg/TCGA_{site}_{patient}/{contrast}/{n:02d}.jpg", "tcga_lgg", label)


def test_balanced_weights_give_every_source_and_contrast_an_equal_share() -> None:
    samples = [_sample(f"k{i}", "kaggle") for i in range(90)]
    samples += [_sample(f"c{i}", "cheng") for i in range(9)]
    samples += [_lgg("0001", "DU", "flair", i, "notumor") for i in range(3)]
    weights = balanced_weights(samples)
    assert weights.sum() == pytest.approx(1.0)
    share: dict[str, float] = {}
    for s, w in zip(samples, weights, strict=True):
        share[sampling_group(s)] = share.get(sampling_group(s), 0.0) + float(w)
    assert share == pytest.approx({"kaggle": 1 / 3, "cheng": 1 / 3, "tcga_lgg:flair": 1 / 3})


def test_effective_class_counts_follow_the_sampling_weights() -> None:
    labels = [0, 0, 0, 1]
    counts = effective_class_counts(labels, np.array([0.1, 0.1, 0.1, 0.7]), 3)
    assert counts == pytest.approx([1.2, 2.8, 0.0])


def test_jpeg_recompression_changes_pixels_and_keeps_shape_and_range() -> None:
    jpeg = RandJpegRecompress(prob=1.0, quality=(20, 20))
    jpeg.set_random_state(1)
    x = torch.rand(1, 64, 64)
    y = jpeg(x)
    assert y.shape == x.shape and float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    assert float((y - x).abs().mean()) > 0.01
    assert torch.equal(RandJpegRecompress(prob=0.0)(x), x)


def test_unknown_augment_is_refused() -> None:
    with pytest.raises(ValueError, match="augment must be one of"):
        build_train_augment(32, augment="invert")


def test_a_balanced_scanner_augmented_run_trains_and_records_its_levers(tiny_data_root: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(
        data_root=tiny_data_root,
        out_dir=tmp_path / "run",
        **TINY,  # type: ignore[arg-type]
        epochs=1,
        max_steps=2,
        sampling="balanced",
        augment="scanner",
        validate=False,  # as the lever study runs it: the best checkpoint is the one epoch, exported all the same
    )
    train(cfg)
    spec, _ = load_model(tmp_path / "run" / "model")
    recorded = spec.extra["training"]["config"]
    assert (recorded["sampling"], recorded["augment"]) == ("balanced", "scanner")


def test_unknown_sampling_is_refused(tiny_data_root: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sampling must be one of"):
        train(TrainConfig(data_root=tiny_data_root, out_dir=tmp_path / "run", **TINY, sampling="oversample"))  # type: ignore[arg-type]


def test_sensitivity_at_specificity_reads_the_roc_point() -> None:
    labels = np.array([0] * 20 + [1] * 10)
    score = np.concatenate([np.linspace(0.0, 0.5, 20), np.linspace(0.4, 1.0, 10)])
    # 95 % specificity allows one of twenty negatives (0.5) above the threshold, so it sits just above the second
    # (0.474): eight of the ten positives (0.533 … 1.0) are above it.
    assert sensitivity_at_specificity(labels, score, 0.95) == pytest.approx(0.8)
    assert sensitivity_at_specificity(labels, score, 0.9) == pytest.approx(0.9)  # two negatives above: 0.467 in
    assert sensitivity_at_specificity(np.ones(3, dtype=np.int64), np.ones(3), 0.95) is None


def test_validation_metrics_separate_seen_and_unseen_sites_and_contrasts() -> None:
    samples = [
        _lgg("0001", "HT", "flair", 1, "glioma"),
        _lgg("0001", "HT", "flair", 2, "notumor"),
        _lgg("0002", "DU", "t1_pre", 1, "glioma"),
        _lgg("0002", "DU", "t1_pre", 2, "notumor"),
        _sample("kaggle/a.jpg", "kaggle", "notumor"),
        _sample("kaggle/b.jpg", "kaggle", "pituitary"),
    ]
    # classes: glioma, meningioma, notumor, pituitary. HT ranks right, DU ranks wrong, Kaggle is right.
    probs = np.array(
        [
            [0.9, 0.0, 0.1, 0.0],
            [0.2, 0.0, 0.8, 0.0],
            [0.3, 0.0, 0.7, 0.0],
            [0.6, 0.0, 0.4, 0.0],
            [0.0, 0.0, 1.0, 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    m = validation_metrics(samples, probs)
    assert m["lgg_unseen_auc"] == 1.0 and m["lgg_unseen_auc_flair"] == 1.0
    assert m["lgg_seen_auc"] == 0.0
    assert m["lgg_unseen_auc_t1_pre"] is None  # no unseen-site T1 in this set
    assert m["public_acc"] == 1.0 and m["kaggle_tumour_auc"] == 1.0


def test_every_arm_has_a_distinct_name_and_the_table_has_a_row_each() -> None:
    names = [a.name for a in arms()]
    assert len(names) == len(set(names)) and names[:2] == ["shipped_2.0.0", "baseline"]
    rows = [{"arm": n, "change": "x", "compute": {"wall_seconds": 60.0}, "public_acc": 0.5} for n in names]
    table = markdown_table(rows)
    assert table.count("\n") == len(names) + 2 and "50.0 %" in table


def test_paired_unseen_delta_is_zero_for_the_same_model_and_positive_for_a_better_one() -> None:
    samples, rows = [], []
    rng = np.random.default_rng(0)
    for patient in range(6):
        for n in range(10):
            label = "glioma" if n < 4 else "notumor"
            samples.append(_lgg(f"{patient:04d}", "HT", "flair", n, label))
            rows.append(label)
    samples.append(_lgg("0099", "DU", "flair", 1, "glioma"))  # a seen-site slice: not part of the delta
    rows.append("glioma")
    tumour = np.array([r == "glioma" for r in rows])
    noisy = np.where(tumour, 0.6, 0.4) + rng.normal(0.0, 0.3, len(rows))
    clean = np.where(tumour, 0.9, 0.1)

    def probs(score: np.ndarray) -> np.ndarray:
        p = np.zeros((len(score), 4))
        p[:, 2] = 1.0 - np.clip(score, 0.0, 1.0)  # p(notumor)
        p[:, 0] = 1.0 - p[:, 2]
        return p

    same = paired_unseen_delta(samples, probs(noisy), probs(noisy), rounds=200)
    assert same == {"value": 0.0, "lo": 0.0, "hi": 0.0, "patients": 6}
    better = paired_unseen_delta(samples, probs(clean), probs(noisy), rounds=200)
    assert better["value"] > 0 and better["lo"] > 0 and better["hi"] <= 1.0


def test_card_section_states_each_levers_verdict_from_its_ci(tmp_path: Path) -> None:
    from triaged.training.model_card_levers import lever_sections

    assert lever_sections(tmp_path) == []  # no study, no section
    base = {"change": "x", "steps": 120, "compute": {"wall_seconds": 600.0}}
    rows = [
        {"arm": "baseline", **base},
        {"arm": "up", **base, "delta_unseen_auc": {"value": 0.02, "lo": 0.01, "hi": 0.03, "patients": 9}},
        {"arm": "down", **base, "delta_unseen_auc": {"value": -0.02, "lo": -0.03, "hi": -0.01, "patients": 9}},
        {"arm": "flat", **base, "delta_unseen_auc": {"value": 0.01, "lo": -0.01, "hi": 0.02, "patients": 9}},
    ]
    (tmp_path / "evaluation").mkdir()
    (tmp_path / "evaluation" / "levers.json").write_text(json.dumps(rows))
    text = "\n".join(lever_sections(tmp_path))
    assert "`up` (x): helped" in text and "`down` (x): hurt" in text
    assert "`flat` (x): no measurable change" in text and "3840 images" in text


def test_compare_refuses_a_malformed_pair_and_a_directory_without_a_model(tmp_path: Path) -> None:
    from triaged.training.levers import main

    data_root = tmp_path / "data"
    (data_root / "tcga_lgg").mkdir(parents=True)
    with pytest.raises(SystemExit) as malformed:
        main(["--data-root", str(data_root), "--out-dir", str(tmp_path / "out"), "--compare", "no-equals-sign"])
    assert malformed.value.code == 2
    with pytest.raises(SystemExit) as missing:
        main(["--data-root", str(data_root), "--out-dir", str(tmp_path / "out"), "--compare", f"x={tmp_path}"])
    assert missing.value.code == 2


def test_full_runs_render_with_their_levers_and_verdict(tmp_path: Path) -> None:
    from triaged.training.model_card_levers import FULL_RUNS_FILE, full_run_lines

    assert full_run_lines(tmp_path) == []
    metrics = {"public_acc": 0.978, "lgg_seen_auc": 0.88, "lgg_unseen_auc": 0.9, "lgg_unseen_sens_at_95spec": 0.69}
    training = {"sampling": "balanced", "augment": "scanner", "lr": 1e-4, "init": "model:models/m-v2", "epoch": 13}
    rows = [
        {"model": "shipped", **metrics},
        {
            "model": "full",
            **metrics,
            "training": {**training, "compute": {"wall_seconds": 600}},
            "delta_unseen_auc_vs_shipped": {"value": -0.007, "lo": -0.024, "hi": 0.008, "patients": 17},
        },
    ]
    (tmp_path / "evaluation").mkdir()
    (tmp_path / "evaluation" / FULL_RUNS_FILE).write_text(json.dumps(rows))
    text = "\n".join(full_run_lines(tmp_path))
    assert "| full | sampling balanced, augment scanner, lr 0.0001, from m-v2 | 13 | 10 | 97.8 % |" in text
    assert "-0.007 [-0.024, +0.008]" in text and "No full run beat 2.0.0" in text
    # a run that helped is named with its CI and what became of it, and the "none beat it" line goes
    better = {
        **rows[1],
        "model": "better",
        "training": {**rows[1]["training"], "data": "+ reformats"},
        "delta_unseen_auc_vs_shipped": {"value": 0.011, "lo": 0.002, "hi": 0.021, "patients": 17},
        "outcome": "shipped as 2.1.0",
    }
    (tmp_path / "evaluation" / FULL_RUNS_FILE).write_text(json.dumps([*rows, better]))
    text = "\n".join(full_run_lines(tmp_path))
    assert "| better | + reformats, sampling balanced" in text and "No full run beat" not in text
    assert (
        "- `better` beat 2.0.0 on the unseen site (Δ AUC +0.011, 95 % CI +0.002 to +0.021, 17 patients): "
        "shipped as 2.1.0." in text
    )


def test_a_strip_run_shows_how_it_stripped(tmp_path: Path) -> None:
    from triaged.training.model_card_levers import FULL_RUNS_FILE, full_run_lines

    metrics = {"public_acc": 0.98, "lgg_seen_auc": 0.9, "lgg_unseen_auc": 0.92, "lgg_unseen_sens_at_95spec": 0.7}
    training = {"sampling": "uniform", "augment": "strip", "lr": 1e-4, "strip_prob": 0.25, "epoch": 3}
    rows = [
        {"model": "shipped", **metrics},
        {"model": "heads", **metrics, "training": {**training, "strip_whole_heads_only": True}},
        {"model": "all", **metrics, "training": {**training, "strip_whole_heads_only": False}},
    ]
    (tmp_path / "evaluation").mkdir()
    (tmp_path / "evaluation" / FULL_RUNS_FILE).write_text(json.dumps(rows))
    text = "\n".join(full_run_lines(tmp_path))
    assert "| heads | sampling uniform, augment strip (p 0.25 of whole heads), lr 0.0001 |" in text
    assert "| all | sampling uniform, augment strip (p 0.25), lr 0.0001 |" in text


def test_a_mixstyle_run_shows_its_mixing_probability_and_its_control_does_not(tmp_path: Path) -> None:
    from triaged.training.model_card_levers import FULL_RUNS_FILE, full_run_lines

    metrics = {"public_acc": 0.98, "lgg_seen_auc": 0.9, "lgg_unseen_auc": 0.92, "lgg_unseen_sens_at_95spec": 0.7}
    training = {"sampling": "uniform", "augment": "standard", "lr": 1e-4, "epoch": "300 steps"}
    rows = [
        {"model": "shipped", **metrics},
        {"model": "control", **metrics, "training": training},
        {"model": "mixstyle", **metrics, "training": {**training, "mixstyle_prob": 0.5}},
    ]
    (tmp_path / "evaluation").mkdir()
    (tmp_path / "evaluation" / FULL_RUNS_FILE).write_text(json.dumps(rows))
    text = "\n".join(full_run_lines(tmp_path))
    assert "| control | sampling uniform, augment standard, lr 0.0001 | 300 steps |" in text
    assert "| mixstyle | sampling uniform, augment standard, MixStyle p 0.5, lr 0.0001 | 300 steps |" in text
