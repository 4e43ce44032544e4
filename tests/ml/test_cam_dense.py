"""À trous (dense) Grad-CAM: the converted DenseNet121 must be the same function, sampled on a denser grid."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.visualize import GradCAM

from triaged.ml.cam import CamConfig, compute_cams, disable_inplace_activations
from triaged.ml.dense_cam import ShiftedAvgPool2x2, atrous_densenet, cell_centres, centred_upsampler
from triaged.ml.inference import Predictor
from triaged.ml.networks import build_network, cam_layer_candidates
from triaged.ml.registry import read_spec, write_spec


@pytest.fixture(scope="module")
def densenet() -> torch.nn.Module:
    torch.manual_seed(0)
    net = build_network("densenet121", 4).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so a wrong alignment cannot hide behind zeros
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    return net


@pytest.mark.parametrize(("factor", "cells"), [(2, 7), (4, 13)])
def test_atrous_features_equal_the_original_at_grid_positions(
    densenet: torch.nn.Module, factor: int, cells: int
) -> None:
    x = torch.rand(2, 1, 128, 128)
    with torch.no_grad():
        original = densenet.features(x)
        dense = atrous_densenet(densenet, factor).features(x)
    assert original.shape == (2, 1024, 4, 4)
    assert dense.shape == (2, 1024, cells, cells)
    torch.testing.assert_close(dense[..., ::factor, ::factor], original, rtol=1e-4, atol=1e-5)
    between = dense[..., 1::factor, 1::factor][..., :3, :3]
    assert (between - original[..., :3, :3]).abs().max() > 1e-2  # in-between cells are new evaluations


def test_atrous_copy_leaves_the_model_alone(densenet: torch.nn.Module) -> None:
    atrous_densenet(densenet, 4)
    assert isinstance(densenet.features.transition3.pool, torch.nn.AvgPool2d)
    assert densenet.features.denseblock4.denselayer1.layers.conv2.dilation == (1, 1)
    with pytest.raises(ValueError, match="factor"):
        atrous_densenet(densenet, 3)
    with pytest.raises(ValueError, match="DenseNet"):
        atrous_densenet(torch.nn.Linear(2, 2), 2)


def test_dense_gradcam_refines_the_plain_one(densenet: torch.nn.Module) -> None:
    """Raw Grad-CAM of the copy, at the original cells, is the original Grad-CAM (global average pool head)."""
    disable_inplace_activations(densenet)
    x = torch.rand(1, 1, 128, 128, requires_grad=True)
    plain = GradCAM(nn_module=densenet, target_layers="class_layers.relu").compute_map(x, class_idx=1)
    net = atrous_densenet(densenet, 2)
    dense = GradCAM(nn_module=net, target_layers="class_layers.relu").compute_map(x, class_idx=1)
    assert dense.shape[-2:] == (7, 7)
    # The copy's pool averages 49 cells instead of 16, so the CAM weights are scaled by 16 / 49.
    torch.testing.assert_close(dense[..., ::2, ::2] * 49 / 16, plain, rtol=1e-3, atol=1e-6)


def test_centred_upsampler_puts_each_cell_at_its_receptive_field_centre() -> None:
    first, spacing = cell_centres(4)
    assert (first, spacing) == (14.0, 8.0)
    maps = torch.zeros(1, 1, 13, 13)
    maps[0, 0, 5, 9] = 1.0
    up = centred_upsampler(first, spacing)((128, 128))(maps)
    assert up.shape == (1, 1, 128, 128)
    assert np.unravel_index(int(up.argmax()), (128, 128)) == (14 + 5 * 8, 14 + 9 * 8)
    assert float(up[0, 0, 14 + 5 * 8 + 4, 14 + 9 * 8]) == pytest.approx(0.5)
    edge = torch.zeros(1, 1, 13, 13)
    edge[0, 0, 0, 0] = 1.0
    clamped = centred_upsampler(first, spacing)((128, 128))(edge)
    assert float(clamped[0, 0, 0, 0]) == 1.0  # outside the outermost centres the edge value is held


def test_shifted_pool_averages_taps_dilation_apart() -> None:
    x = torch.arange(16.0).view(1, 1, 4, 4)
    out = ShiftedAvgPool2x2(2)(x)
    assert out.shape == (1, 1, 2, 2)
    assert float(out[0, 0, 0, 0]) == pytest.approx((0 + 2 + 8 + 10) / 4)


@pytest.mark.parametrize("method", ["gradcam", "gradcampp"])
def test_compute_cams_with_atrous_gives_unit_maps(densenet: torch.nn.Module, method: str) -> None:
    cams = compute_cams(densenet, torch.rand(2, 1, 128, 128), 0, "class_layers.relu", method=method, atrous=4)
    assert cams.shape == (2, 128, 128)
    assert cams.dtype == np.float32
    assert cams.min() >= 0.0
    assert cams.max() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="atrous"):
        compute_cams(densenet, torch.rand(1, 1, 128, 128), 0, "class_layers.relu", atrous=3)


def test_candidates_include_the_dense_variants() -> None:
    candidates = cam_layer_candidates("densenet121")
    assert ("class_layers.relu", 4) in candidates
    assert ("class_layers.relu", 1) in candidates
    assert all(atrous == 1 for _, atrous in cam_layer_candidates("resnet50"))


def test_cam_config_reads_old_sections_and_round_trips_through_model_json(
    random_model_dir: Path, tmp_path: Path
) -> None:
    assert CamConfig.from_dict({"target_layer": "a", "method": "gradcampp"}, "b") == CamConfig("a", "gradcampp", 1)
    assert CamConfig.from_dict({}, "b") == CamConfig("b", "gradcam", 1)
    model_dir = tmp_path / "model"
    shutil.copytree(random_model_dir, model_dir)
    spec = read_spec(model_dir)
    assert "cam" not in spec.extra
    assert Predictor.from_dir(model_dir, device="cpu", precision="fp32").cam_config == CamConfig("features.13")
    chosen = CamConfig("features.13", "gradcampp", 2)
    write_spec(model_dir, dataclasses.replace(spec, extra={**spec.extra, "cam": chosen.to_dict()}))
    assert json.loads((model_dir / "model.json").read_text())["cam"]["atrous"] == 2
    assert Predictor.from_dir(model_dir, device="cpu", precision="fp32").cam_config == chosen
    with pytest.raises(ValueError, match="atrous"):
        CamConfig.from_dict({"atrous": 8}, "b")
