"""Flip test-time augmentation: what ``triaged evaluate --tta`` measured is what the daemon computes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from triaged.ml.inference import Predictor
from triaged.ml.registry import read_spec, write_spec


def test_flip_tta_averages_the_mirror_and_keeps_the_slice_features(random_model_dir: Path, tmp_path: Path) -> None:
    x = torch.rand(3, 1, 64, 64)
    plain = Predictor.from_dir(random_model_dir, device="cpu", precision="fp32")
    assert plain.flip_tta is False  # model.json without an inference section: no TTA
    logits, features = plain.logits_and_features(x)
    mirrored = plain.logits(torch.flip(x, dims=[-1]))
    assert not np.allclose(logits, mirrored)  # the random model is not mirror-symmetric: the test can fail

    tta_dir = tmp_path / "tta"
    tta_dir.mkdir()
    for item in random_model_dir.iterdir():
        (tta_dir / item.name).write_bytes(item.read_bytes())
    spec = read_spec(tta_dir)
    write_spec(tta_dir, dataclasses.replace(spec, extra={**spec.extra, "inference": {"flip_tta": True}}))
    tta = Predictor.from_dir(tta_dir, device="cpu", precision="fp32")
    assert tta.flip_tta is True
    tta_logits, tta_features = tta.logits_and_features(x)
    np.testing.assert_allclose(tta_logits, (logits + mirrored) / 2.0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(tta_features, features, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(tta.features(x), features, rtol=1e-5, atol=1e-5)
