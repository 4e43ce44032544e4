"""Score Grad-CAM localisation against the Cheng tumour masks (pointing game and IoU of the thresholded map)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from triaged.ml.cam import compute_cams
from triaged.ml.transforms import content_box
from triaged.training.metrics import bootstrap_ci, with_ci


def evenly_spaced(rows: list[int], limit: int) -> list[int]:
    """At most ``limit`` of ``rows``, spread evenly over them (deterministic, so every evaluation scores the same)."""
    return rows[:: max(1, len(rows) // max(1, limit))][:limit]


def mask_to_model_space(mask: np.ndarray, size: int) -> np.ndarray:
    """Map a (H, W) mask through the same resize-longest-side + centre-pad geometry as the images."""
    top, left, h, w = content_box((int(mask.shape[0]), int(mask.shape[1])), size)
    src = torch.from_numpy(mask.astype(np.float32))[None, None]
    resized = nn.functional.interpolate(src, size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy()
    out = np.zeros((size, size), dtype=bool)
    out[top : top + h, left : left + w] = resized >= 0.5
    return out


def load_masks(mask_paths: Sequence[Path], size: int) -> np.ndarray:
    """(N, size, size) bool tumour masks from PNG files, in the model's input geometry."""
    masks = []
    for path in mask_paths:
        with Image.open(path) as m:
            masks.append(mask_to_model_space(np.asarray(m.convert("L")) > 127, size))
    return np.stack(masks) if masks else np.zeros((0, size, size), dtype=bool)


def cheng_mask_path(data_root: Path, image_path: str) -> Path:
    """Where the Cheng figshare mask of an image (manifest path) lies."""
    return data_root / image_path.replace("/images/", "/masks/").replace(".jpg", "_mask.png")


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    if radius <= 0:
        return mask
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    pooled = nn.functional.max_pool2d(t, kernel_size=2 * radius + 1, stride=1, padding=radius)
    result: np.ndarray = pooled[0, 0].numpy() > 0
    return result


def localisation_scores(
    cams: np.ndarray, masks: np.ndarray, *, tolerance: int | None = None, cam_threshold: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """Per-image pointing-game hits (CAM maximum within ``tolerance`` px of the mask), IoU of CAM ≥ threshold."""
    if tolerance is None:  # the usual 15 px at 224 px (Zhang et al. 2018), scaled to the map size
        tolerance = round(15 * cams.shape[-1] / 224) if len(cams) else 0
    hits = np.zeros(len(cams), dtype=bool)
    ious = np.zeros(len(cams), dtype=np.float64)
    for i, (cam, mask) in enumerate(zip(cams, masks, strict=True)):
        y, x = np.unravel_index(int(np.argmax(cam)), cam.shape)
        hits[i] = bool(_dilate(mask, tolerance)[y, x])
        region = cam >= cam_threshold
        union = (region | mask).sum()
        ious[i] = float((region & mask).sum() / union) if union else 0.0
    return hits, ious


def score_cams(
    model: nn.Module,
    images: torch.Tensor,
    labels: Sequence[int],
    masks: np.ndarray,
    target_layer: str,
    *,
    method: str = "gradcam",
    atrous: int = 1,
    batch_size: int = 16,
    rounds: int = 1000,
) -> tuple[dict[str, Any], np.ndarray]:
    """Compute CAMs for the true class of each image and score them against ``masks`` (N, S, S) bool."""
    cams = np.zeros((len(labels), images.shape[-2], images.shape[-1]), dtype=np.float32)
    if len(labels) == 0:
        empty = with_ci(float("nan"), (float("nan"), float("nan")))
        return {"method": method, "atrous": atrous, "n": 0, "pointing_game": empty, "mean_iou": empty}, cams
    labels_arr = np.asarray(labels)
    for cls in np.unique(labels_arr):
        idx = np.flatnonzero(labels_arr == cls)
        for start in range(0, idx.size, batch_size):
            chunk = idx[start : start + batch_size]
            cams[chunk] = compute_cams(model, images[chunk], int(cls), target_layer, method=method, atrous=atrous)
    hits, ious = localisation_scores(cams, masks)
    n = len(labels)
    report = {
        "method": method,
        "atrous": atrous,
        "n": n,
        "pointing_game": with_ci(float(hits.mean()), bootstrap_ci(lambda i: float(hits[i].mean()), n, rounds=rounds)),
        "mean_iou": with_ci(float(ious.mean()), bootstrap_ci(lambda i: float(ious[i].mean()), n, rounds=rounds)),
        "pointing_game_by_class_index": {
            str(int(c)): float(hits[labels_arr == c].mean()) for c in np.unique(labels_arr)
        },
    }
    return report, cams
