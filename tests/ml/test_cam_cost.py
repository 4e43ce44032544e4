"""Grad-CAM backpropagated only down to its layer gives the maps of MONAI's full backward pass."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.visualize import GradCAM, GradCAMpp

from triaged.ml.cam import compute_cams, disable_inplace_activations, scale_to_unit
from triaged.ml.dense_cam import atrous_densenet, cell_centres, centred_upsampler
from triaged.ml.networks import build_network


def _full_backward(model: torch.nn.Module, x: torch.Tensor, layer: str, method: str, atrous: int) -> np.ndarray:
    """MONAI as documented: input and every weight require grad, the backward pass runs to the input."""
    disable_inplace_activations(model)
    cls = GradCAM if method == "gradcam" else GradCAMpp
    net, extra = model, {}
    if atrous > 1:
        net, extra = atrous_densenet(model, atrous), {"upsampler": centred_upsampler(*cell_centres(atrous))}
    cam = cls(nn_module=net, target_layers=layer, postprocessing=scale_to_unit, **extra)
    chunks = [x] if method == "gradcam" else [x[i : i + 1] for i in range(len(x))]
    with torch.enable_grad():
        maps = [cam(c.clone().requires_grad_(True), class_idx=1).detach() for c in chunks]
    return np.clip(np.nan_to_num(torch.cat(maps).numpy()[:, 0]), 0.0, 1.0)


@pytest.mark.parametrize(
    ("layer", "method", "atrous"),
    [
        ("features.transition3.conv", "gradcam", 1),  # the shipped model's choice
        ("class_layers.relu", "gradcam", 1),  # a layer without weights of its own
        ("class_layers.relu", "gradcampp", 2),
    ],
)
def test_maps_equal_the_full_backward_pass(layer: str, method: str, atrous: int) -> None:
    torch.manual_seed(0)
    model = build_network("densenet121", num_classes=4).eval()
    x = torch.rand(2, 1, 64, 64)
    maps = compute_cams(model, x, 1, layer, method=method, atrous=atrous)
    assert all(p.requires_grad for p in model.parameters())  # the weights are unfrozen again
    assert all(p.grad is None for p in model.parameters())  # and no weight gradient was computed
    expected = _full_backward(model, x, layer, method, atrous)
    if atrous == 1:  # (an à trous reference computes them on its copy)
        assert any(p.grad is not None for p in model.parameters())  # the reference did compute them
    np.testing.assert_array_equal(maps, expected)
    assert maps.max() == pytest.approx(1.0)  # real maps, not blanks: the comparison can fail
