"""Evaluation end to end on a tiny synthetic dataset: report, plots, calibration written back, model card."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from triaged.ml.registry import read_spec
from triaged.training.camscore import localisation_scores, mask_to_model_space
from triaged.training.evaluate import EvalOptions, evaluate_model
from triaged.training.train import TrainConfig, train


def test_localisation_scores_by_hand() -> None:
    cams = np.zeros((2, 8, 8), np.float32)
    masks = np.zeros((2, 8, 8), bool)
    masks[:, 2:4, 2:4] = True
    cams[0, 2:4, 2:4] = 1.0  # exactly on the mask: hit, IoU 1
    cams[1, 7, 7] = 1.0  # far corner: miss, IoU 0
    hits, ious = localisation_scores(cams, masks, tolerance=1)
    assert hits.tolist() == [True, False]
    assert ious.tolist() == [1.0, 0.0]


def test_mask_geometry_matches_image_geometry() -> None:
    mask = np.zeros((50, 100), bool)
    mask[:, 50:] = True
    out = mask_to_model_space(mask, 64)
    assert out.shape == (64, 64) and not out[:16].any() and out[16:48, 40:].all() and not out[16:48, :24].any()


@pytest.mark.slow
def test_evaluate_writes_report_and_calibration(tiny_data_root: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(
        TrainConfig(
            data_root=tiny_data_root,
            out_dir=run,
            arch="smallcnn",
            input_size=32,
            epochs=1,
            batch_size=8,
            threads=1,
            workers=0,
            precision="fp32",
        )
    )
    report = evaluate_model(
        run / "model",
        tiny_data_root,
        tmp_path / "eval",
        EvalOptions(rounds=20, cam_limit=4, release=False, precision="fp32", threads=1),
    )
    assert {"val", "test", "clean_test", "clean_test_not_cheng"} <= set(report["sets"])
    for name in ("evaluation.json", "evaluation.md", "roc_test.png", "confusion_test.png", "reliability_test.png"):
        assert (tmp_path / "eval" / name).is_file(), name
    assert json.loads((tmp_path / "eval" / "evaluation.json").read_text())["model"]["arch"] == "smallcnn"
    spec = read_spec(run / "model")
    assert spec.temperature == pytest.approx(report["temperature"])
    assert spec.ood["method"] == "mahalanobis" and (run / "model" / "ood.safetensors").is_file()
    assert (run / "model" / "MODEL_CARD.md").read_text().startswith("# Model card")
