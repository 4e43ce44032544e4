"""The public inference API on a random model: types, shapes, gating and Grad-CAM geometry."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from structlog.testing import capture_logs

from triaged.ml.api import SeriesMeta, Triage

META = SeriesMeta("MR", "HEAD", "t1_gre_3d", "t1_gre_3d", ("ORIGINAL", "PRIMARY", "M"), ("GR",), ("SP",), (), 4)


def _slices() -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:90, :70]
    head = ((yy - 45) ** 2 / 40**2 + (xx - 35) ** 2 / 30**2 < 1) * 800.0
    out = [(head + rng.normal(0, 20, head.shape)).astype(np.float32) for _ in range(3)]
    return [np.zeros((90, 70), np.float32), *out]


def test_assess_returns_plain_numpy_results(random_model_dir: Path) -> None:
    with capture_logs() as logs:
        triage = Triage(random_model_dir, device="cpu", precision="fp32", threads=1)
    assert any(e["event"] == "model_loaded" and e["precision"] == "fp32" for e in logs)
    assert triage.classes == ("glioma", "meningioma", "notumor", "pituitary")
    assert len(triage.weights_sha256) == 64
    result = triage.assess(_slices(), META, cam_top_k=2)
    assert result.assessable and result.reason is None
    assert result.label in triage.classes
    assert sum(result.class_probabilities.values()) == pytest.approx(1.0)
    assert result.slice_probabilities.shape == (4, 4) and result.slice_probabilities.dtype == np.float32
    assert result.slice_in_brain.tolist() == [False, True, True, True]
    assert 0 not in result.key_slice_indices
    assert isinstance(result.urgency, float) and 0.0 <= result.urgency <= 1.0
    assert result.urgent == (result.urgency >= result.threshold)
    assert len(result.cams) == 2
    for cam in result.cams.values():
        assert cam.shape == (90, 70) and cam.dtype == np.float32
        assert cam.min() >= 0.0 and cam.max() <= 1.0
    assert set(result.timings) == {"preprocess", "inference", "cam"}


def test_gated_series_is_never_urgent(random_model_dir: Path) -> None:
    triage = Triage(random_model_dir, device="cpu", precision="fp32", threads=1)
    result = triage.assess(_slices(), dataclasses.replace(META, diffusion_b_values=(0.0, 1000.0)))
    assert not result.assessable and not result.urgent
    assert "diffusion" in (result.reason or "")
    assert result.slice_probabilities.shape == (0, 4)
    assert result.slice_in_brain.shape == (4,) and result.cams == {}


def test_blank_series_is_not_assessable(random_model_dir: Path) -> None:
    triage = Triage(random_model_dir, device="cpu", precision="fp32", threads=1)
    result = triage.assess([np.zeros((32, 32), np.float32)] * 2, META)
    assert not result.assessable and result.reason == "no slice contains enough brain"


def test_bad_input_raises(random_model_dir: Path) -> None:
    triage = Triage(random_model_dir, device="cpu", precision="fp32", threads=1)
    with pytest.raises(ValueError, match="2-D"):
        triage.assess([np.zeros((3, 8, 8), np.float32)], META)
    with pytest.raises(ValueError, match="NaN"):
        triage.assess([np.full((8, 8), np.nan, np.float32)], META)
    with pytest.raises(ValueError, match="precision"):
        Triage(random_model_dir, precision="int4")


def test_bf16_is_chosen_only_when_clearly_faster() -> None:
    from triaged.ml.device import faster_precision

    assert faster_precision({"fp32": 1.0, "bf16": 0.5}) == "bf16"
    assert faster_precision({"fp32": 1.0, "bf16": 0.95}) == "fp32"  # a tie is not worth bf16's rounding
    assert faster_precision({"fp32": 1.0, "bf16": 1.3}) == "fp32"


def test_cpu_precisions_are_timed_on_the_model_itself(random_model_dir: Path) -> None:
    from triaged.ml.device import time_cpu_precisions
    from triaged.ml.registry import load_model

    _, model = load_model(random_model_dir)
    seen: list[torch.dtype] = []

    def record_dtype(_module: torch.nn.Module, _args: object) -> None:
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else torch.float32)

    model.register_forward_pre_hook(record_dtype)
    timings = time_cpu_precisions(model.eval(), (2, 1, 64, 64), repeats=2)
    assert set(timings) == {"fp32", "bf16"} and all(t > 0 for t in timings.values())
    assert seen == [torch.float32] * 3 + [torch.bfloat16] * 3  # one warm-up pass + 2 timed, per precision
