"""Grad-CAM / Grad-CAM++ heat maps (MONAI) mapped back onto the original slice geometry."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from monai.visualize import GradCAM, GradCAMpp
from torch import nn

from triaged.ml.dense_cam import ATROUS_FACTORS, atrous_densenet, cell_centres, centred_upsampler
from triaged.ml.transforms import content_box

CAM_METHODS = ("gradcam", "gradcampp")


@dataclasses.dataclass(frozen=True)
class CamConfig:
    """The ``cam`` section of ``model.json``: which layer and method, and how much denser than the network's map.

    ``atrous`` 1 is the plain network (what model.json files without the key mean); 2 or 4 see
    :mod:`triaged.ml.dense_cam`.
    """

    target_layer: str
    method: str = "gradcam"
    atrous: int = 1

    def __post_init__(self) -> None:
        if self.method not in CAM_METHODS:
            raise ValueError(f"cam method must be one of {CAM_METHODS}, got {self.method!r}")
        if self.atrous not in ATROUS_FACTORS:
            raise ValueError(f"cam atrous must be one of {ATROUS_FACTORS}, got {self.atrous!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], default_layer: str) -> CamConfig:
        return cls(
            target_layer=str(data.get("target_layer", default_layer)),
            method=str(data.get("method", "gradcam")),
            atrous=int(data.get("atrous", 1)),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def compute_cams(
    model: nn.Module,
    x: torch.Tensor,
    class_index: int,
    target_layer: str,
    *,
    method: str = "gradcam",
    atrous: int = 1,
) -> np.ndarray:
    """Return (N, S, S) float32 maps in [0, 1] for ``class_index`` on preprocessed inputs ``x`` (N, 1, S, S).

    Runs in fp32 with gradients (CAM needs them) regardless of the inference precision; each map is min-max
    normalised per slice with the most salient pixel at 1 (see :func:`scale_to_unit`). ``atrous`` 2 or 4 computes
    the CAM on an à trous copy of a DenseNet121 (:mod:`triaged.ml.dense_cam`) whose final map is that much denser,
    upsampled with each cell at its receptive-field centre.
    """
    if method not in CAM_METHODS:
        raise ValueError(f"method must be one of {CAM_METHODS}, got {method!r}")
    if atrous not in ATROUS_FACTORS:
        raise ValueError(f"atrous must be one of {ATROUS_FACTORS}, got {atrous!r}")
    disable_inplace_activations(model)
    cls = GradCAM if method == "gradcam" else GradCAMpp
    net = model
    if atrous == 1:
        cam = cls(nn_module=model, target_layers=target_layer, postprocessing=scale_to_unit)
    else:
        net = atrous_densenet(model, atrous)
        upsampler = centred_upsampler(*cell_centres(atrous))
        cam = cls(nn_module=net, target_layers=target_layer, upsampler=upsampler, postprocessing=scale_to_unit)
    param = next(model.parameters())
    # MONAI's GradCAM++ mis-broadcasts its score for batches > 1, so it runs one slice at a time.
    chunks = [x] if method == "gradcam" else [x[i : i + 1] for i in range(x.shape[0])]
    maps = []
    with torch.enable_grad(), _gradients_from(net, target_layer):
        for chunk in chunks:
            inp = chunk.to(param.device, param.dtype).contiguous()
            maps.append(cam(inp, class_idx=class_index).detach().float().cpu())
    out = torch.cat(maps).numpy()[:, 0]
    result: np.ndarray = np.clip(np.nan_to_num(out, nan=0.0), 0.0, 1.0).astype(np.float32)
    return result


@contextlib.contextmanager
def _gradients_from(net: nn.Module, target_layer: str) -> Iterator[None]:
    """Backpropagate only from the score down to ``target_layer``: all Grad-CAM needs, half the cost.

    With the weights frozen and the target layer's input made a leaf that requires grad, autograd computes no
    weight gradients and stops at the layer instead of running back to the input; the maps are bit-identical.
    """
    flags = [(p, p.requires_grad) for p in net.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)

    def leaf_inputs(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(a.detach().requires_grad_(True) if isinstance(a, torch.Tensor) else a for a in args)

    handle = net.get_submodule(target_layer).register_forward_pre_hook(leaf_inputs)
    try:
        yield
    finally:
        handle.remove()
        for p, flag in flags:
            p.requires_grad_(flag)


def scale_to_unit(maps: torch.Tensor) -> torch.Tensor:
    """Min-max scale each map of a (N, 1, H, W) batch to [0, 1], highest saliency at 1.

    MONAI's default CAM normaliser maps (min, max) to (1, 0) and so flips magnitudes: the overlay would
    highlight the least important region.
    """
    flat = maps.flatten(1)
    shape = (-1, *([1] * (maps.dim() - 1)))
    low = flat.min(dim=1).values.view(shape)
    high = flat.max(dim=1).values.view(shape)
    return (maps - low) / (high - low).clamp_min(1e-8)


def disable_inplace_activations(model: nn.Module) -> None:
    """Make ReLUs out-of-place: MONAI's backward hooks cannot see through in-place ops (results are identical)."""
    for module in model.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False


def cam_to_slice(cam: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Crop a square model-space map to where the slice lies and resize it to the slice's (H, W)."""
    top, left, h, w = content_box(shape, cam.shape[0])
    crop = torch.from_numpy(np.ascontiguousarray(cam[top : top + h, left : left + w]))[None, None]
    resized = nn.functional.interpolate(crop, size=shape, mode="bilinear", align_corners=False)[0, 0]
    return resized.clamp_(0.0, 1.0).numpy().astype(np.float32)
