"""Mask-guided attention: train the class activation map of the true class to sit on the tumour.

Why: trained on labels alone, the network learns where a tumour class is *likely* (the sella for pituitary, the
convexity for meningioma) and its Grad-CAM points at that anatomy, not at the lesion (pointing game 42.5 % for
model 1.1.0). Cheng's slices come with tumour masks; for those, an extra loss asks that the spatial distribution of
the true class's CAM match the distribution of tumour area over the final feature grid. For a DenseNet (ReLU →
global average pool → linear) that CAM is exactly what Grad-CAM at ``class_layers.relu`` shows, up to scale.
"""

from __future__ import annotations

import torch
from torch import nn

ATTENTION_ARCHS = ("densenet121",)


def logits_and_cams(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B, C) and the class activation map of each sample's ``labels`` class (B, h, w), in one pass."""
    try:
        features, relu, pool, flatten, out = (
            model.get_submodule(name)
            for name in (
                "features",
                "class_layers.relu",
                "class_layers.pool",
                "class_layers.flatten",
                "class_layers.out",
            )
        )
    except AttributeError as exc:
        raise ValueError(f"mask-guided attention supports {ATTENTION_ARCHS} only") from exc
    if not isinstance(out, nn.Linear):
        raise ValueError(f"mask-guided attention supports {ATTENTION_ARCHS} only")
    activations: torch.Tensor = relu(features(x))
    logits: torch.Tensor = out(flatten(pool(activations)))
    weights = out.weight[labels].to(activations.dtype)  # (B, K)
    cams = torch.einsum("bk,bkhw->bhw", weights, activations)
    return logits, cams


def mask_distribution(masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Share of each sample's tumour area that falls in each cell of the (h, w) grid; rows sum to 1 (or 0)."""
    area = nn.functional.adaptive_avg_pool2d(masks[:, None].float(), grid)[:, 0]
    total = area.flatten(1).sum(1).clamp_min(1e-8).view(-1, 1, 1)
    return area / total


def attention_loss(cams: torch.Tensor, masks: torch.Tensor, has_mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy between the tumour-area distribution and the softmax of the CAM, over samples with a mask.

    Zero (and no gradient) for a batch without masks, so batches of Kaggle-only images cost nothing extra.
    """
    chosen = has_mask & (masks.flatten(1).amax(1) > 0.5)
    if not bool(chosen.any()):
        return cams.sum() * 0.0
    target = mask_distribution(masks[chosen], (int(cams.shape[-2]), int(cams.shape[-1]))).flatten(1)
    log_p = torch.log_softmax(cams[chosen].float().flatten(1), dim=1)
    return -(target * log_p).sum(1).mean()


def cell_hits(cams: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Whether each CAM's strongest cell covers any tumour (a coarse pointing game, cheap enough for every epoch)."""
    grid = (int(cams.shape[-2]), int(cams.shape[-1]))
    covered = nn.functional.adaptive_max_pool2d(masks[:, None].float(), grid)[:, 0].flatten(1) > 0.5
    best = cams.flatten(1).argmax(1)
    return covered.gather(1, best[:, None])[:, 0]
