"""Denser Grad-CAM maps for DenseNet121 by "à trous" conversion (a CAM-only copy of the network).

The last DenseNet121 feature map has stride 32 (4x4 at 128 px), so a CAM's maximum can only land near 16 fixed
points. Replacing the stride-2 average pools of the last transitions by stride-1 pools and dilating the 3x3 convs
after them (Chen et al., DeepLab, 2016) computes the same features on a grid ``factor`` times denser: at the
original grid positions the values are exactly the original ones, the cells in between are real evaluations of
the same network rather than interpolation. The weights are shared, nothing is retrained.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sized

import torch
from torch import nn

ATROUS_FACTORS = (1, 2, 4)
# Receptive-field centre (input pixel index) of DenseNet121's first final-map cell, and the final map's stride:
# conv0 (k7 s2 p3) and pool0 (k3 s2 p1) keep cell 0 centred on pixel 0; each 2x2 average pool adds half a cell.
_DENSENET_FIRST_CENTRE = 14.0
_DENSENET_STRIDE = 32


class ShiftedAvgPool2x2(nn.Module):
    """Stride-1 2x2 average pool whose taps are ``dilation`` cells apart (``AvgPool2d`` cannot dilate)."""

    def __init__(self, dilation: int) -> None:
        super().__init__()
        self.dilation = dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.dilation
        return (x[..., :-d, :-d] + x[..., :-d, d:] + x[..., d:, :-d] + x[..., d:, d:]) / 4.0


def _dilate_block(block: nn.Module, dilation: int) -> None:
    for module in block.modules():
        if isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3):
            module.dilation = (dilation, dilation)
            module.padding = (dilation, dilation)


def atrous_densenet(model: nn.Module, factor: int) -> nn.Module:
    """Return a deep copy of a MONAI DenseNet121 whose final feature map is ``factor`` (2 or 4) times denser.

    ``factor`` 2 converts ``transition3``/``denseblock4``; 4 also ``transition2``/``denseblock3``. Feature cell
    ``factor * j`` of the copy equals cell ``j`` of the original; the copy's logits differ slightly because the
    global average pool now also sees the cells in between (Grad-CAM weights only change by a constant).
    """
    if factor not in (2, 4):
        raise ValueError(f"atrous factor must be 2 or 4, got {factor}")
    names = [name for name, _ in model.named_modules()]
    if "features.transition3.pool" not in names or "features.denseblock4" not in names:
        raise ValueError("atrous conversion needs a MONAI DenseNet (features.transition3.pool not found)")
    net = copy.deepcopy(model)
    # (transition, following block, pool tap spacing, conv dilation): each converted stage doubles the density.
    stages = [("transition3", "denseblock4", 1, 2)]
    if factor == 4:
        stages = [("transition2", "denseblock3", 1, 2), ("transition3", "denseblock4", 2, 4)]
    for transition, block, pool_dilation, conv_dilation in stages:
        net.get_submodule(f"features.{transition}").pool = ShiftedAvgPool2x2(pool_dilation)
        _dilate_block(net.get_submodule(f"features.{block}"), conv_dilation)
    return net


def cell_centres(factor: int) -> tuple[float, float]:
    """(first centre, spacing) in input pixels of the final DenseNet121 map cells with ``factor`` x density."""
    if factor not in ATROUS_FACTORS:
        raise ValueError(f"atrous factor must be one of {ATROUS_FACTORS}, got {factor}")
    return _DENSENET_FIRST_CENTRE, _DENSENET_STRIDE / factor


def centred_upsampler(first: float, spacing: float) -> Callable[[Sized], Callable[[torch.Tensor], torch.Tensor]]:
    """A MONAI ``upsampler`` that puts map cell ``i`` at input pixel ``first + i * spacing`` (bilinear, edge-clamped).

    MONAI's default assumes the map tiles the input evenly, which is wrong for a 7x7 or 13x13 map from an
    un-padded stride-1 pool (it would shift and stretch the map by up to half a tumour).
    """

    def make(spatial_size: Sized) -> Callable[[torch.Tensor], torch.Tensor]:
        size = [int(s) for s in spatial_size]  # type: ignore[attr-defined]

        def up(maps: torch.Tensor) -> torch.Tensor:
            h, w = maps.shape[-2:]
            axes = []
            for n, cells in zip(size, (h, w), strict=True):
                pos = (torch.arange(n, dtype=maps.dtype, device=maps.device) - first) / spacing
                axes.append(2.0 * pos / max(cells - 1, 1) - 1.0)
            gy, gx = torch.meshgrid(axes[0], axes[1], indexing="ij")
            grid = torch.stack((gx, gy), dim=-1).expand(maps.shape[0], -1, -1, -1)
            return nn.functional.grid_sample(maps, grid, mode="bilinear", padding_mode="border", align_corners=True)

        return up

    return make
