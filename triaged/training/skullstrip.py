"""A crude skull strip of one brain MR slice, to imitate skull-stripped series (BraTS-style volumes).

Why: public glioma volumes are often distributed skull-stripped, and no training image is. In a first probe on
the tcga_lgg validation patients (this strip, its mask taken from the mean of the three contrasts), 2.1.0's slice
tumour AUC fell from 0.913 to 0.743 on the unseen site (FLAIR 0.975 to 0.810). This strip is used twice: as a
training augmentation (:class:`triaged.training.augment.RandSkullStrip`) and to measure that gap on validation
(:mod:`triaged.training.strip_eval`). It is not a brain extraction tool: the head is the tissue's row and column
span, and the brain that span eroded by a few millimetres' worth of pixels (scalp, skull and meninges gone, some
cortex lost, some skull left at the skull base), which is the kind of edge real strippers leave too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812

from triaged.ml.aggregate import head_span

HEAD_LEVEL = 0.12  # of the smoothed slice's 99th percentile: scalp, fat and brain are above it, air below
FRAME_MARGIN = 0.02  # of the image size: tissue this close to an edge means the head is cropped by the frame
DEFAULT_EROSION = 0.047  # of the image size: 12 px of a 256 px tcga_lgg slice (about 11 mm at 0.9 mm pixels)


def _tissue(image: torch.Tensor) -> torch.Tensor:
    smooth = F.avg_pool2d(image[None, None].float(), 5, 1, 2)[0, 0]
    return smooth > HEAD_LEVEL * torch.quantile(smooth.flatten(), 0.99)


def head_mask(image: torch.Tensor) -> torch.Tensor:
    """(H, W) → bool: pixels inside both the row span and the column span of the tissue (skull and cavities too),
    the daemon's own head measure (:func:`triaged.ml.aggregate.head_span`)."""
    return torch.from_numpy(head_span(_tissue(image).numpy()))


def head_inside_frame(image: torch.Tensor, margin: float = FRAME_MARGIN) -> bool:
    """True when no tissue lies within ``margin`` × the image size of its edges: the whole head is in the picture.

    Why: a skull-stripped volume's slices show the whole brain with air around it. A slice cropped to the skull
    (most Kaggle exports) stripped by :func:`skull_strip` loses brain at the frame, peripheral lesions with it,
    which no real stripper does, so ``RandSkullStrip(whole_heads_only=True)`` leaves such slices as they are.
    """
    tissue = _tissue(image)
    edge = max(1, round(margin * max(image.shape)))
    inner = torch.zeros_like(tissue)
    inner[edge:-edge, edge:-edge] = True
    return not bool((tissue & ~inner).any())


def brain_mask(image: torch.Tensor, erosion: float = DEFAULT_EROSION) -> torch.Tensor:
    """The head eroded by ``erosion`` × the image size in pixels: alternating square and cross steps (an octagon,
    close to a disk), so the brain keeps a round outline."""
    mask = head_mask(image).float()[None, None]
    steps = max(1, round(erosion * max(image.shape)))
    for step in range(steps):
        if step % 2 == 0:
            mask = -F.max_pool2d(-mask, 3, 1, 1)
        else:
            mask = torch.minimum(-F.max_pool2d(-mask, (3, 1), 1, (1, 0)), -F.max_pool2d(-mask, (1, 3), 1, (0, 1)))
    return mask[0, 0] > 0.5


def skull_strip(image: torch.Tensor, erosion: float = DEFAULT_EROSION) -> torch.Tensor:
    """``image`` with everything outside :func:`brain_mask` set to its minimum (the air of a stripped volume)."""
    floor = image.min()
    return torch.where(brain_mask(image, erosion), image, floor)
