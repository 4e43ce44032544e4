"""Grad-CAM must point at what drives the score (regression: MONAI's default normaliser inverts maps)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from triaged.ml.cam import compute_cams, scale_to_unit


class _LinearSaliency(nn.Module):
    """Class 0's score is the mean of the input: its Grad-CAM is proportional to the input intensity."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(1, 1, 1, bias=False)
        nn.init.ones_(self.features.weight)
        self.head = nn.Linear(1, 2, bias=False)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[1.0], [-1.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.features(x).mean(dim=(2, 3)))
        return out


def test_scale_to_unit_keeps_the_maximum_on_top() -> None:
    maps = torch.tensor([[[[0.0, 2.0], [1.0, 4.0]]], [[[3.0, 3.0], [3.0, 3.0]]]])
    scaled = scale_to_unit(maps)
    assert torch.allclose(scaled[0, 0], torch.tensor([[0.0, 0.5], [0.25, 1.0]]))
    assert torch.all(scaled[1] == 0)


def test_cam_is_brightest_where_the_evidence_is() -> None:
    torch.manual_seed(0)
    x = torch.full((2, 1, 32, 32), 0.1)
    x[0, 0, 4:10, 4:10] = 1.0
    x[1, 0, 20:28, 18:26] = 1.0
    for method in ("gradcam", "gradcampp"):
        cams = compute_cams(_LinearSaliency(), x, class_index=0, target_layer="features", method=method)
        assert cams.shape == (2, 32, 32)
        assert cams.min() >= 0.0
        assert cams.max() <= 1.0
        assert np.unravel_index(cams[0].argmax(), cams[0].shape) in {(r, c) for r in range(4, 10) for c in range(4, 10)}
        assert cams[0, 4:10, 4:10].mean() > 0.9
        assert cams[0, 20:, 20:].mean() < 0.1
        assert cams[1, 20:28, 18:26].mean() > 0.9
