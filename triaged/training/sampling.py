"""Source- and contrast-balanced sampling (``--sampling balanced``, ``--sampling kaggle_contrast``).

Why: Kaggle alone is almost half the training images and nearly all of its ``notumor`` images come from one
source, so uniform sampling lets "looks like that source" stand in for "no tumour". Balanced sampling gives every
(source, contrast) group the same share of each epoch; the class weights of the loss are then computed from the
class mix that sampling produces, so classes are not re-weighted twice.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np

from triaged.training.data import Sample
from triaged.training.lgg import is_lgg, lgg_contrast

MAX_UPWEIGHT = 4.0  # kaggle_contrast: the most any image is drawn relative to uniform sampling
MIN_CLASS_SHARE = 0.05  # kaggle_contrast: a class must hold this share of a contrast's images to be equalised


def sampling_group(sample: Sample) -> str:
    """The (source, contrast) group of an image: tcga_lgg by its contrast, Cheng is post-contrast T1 only, and
    Kaggle has no contrast labels, so it is one group."""
    return f"tcga_lgg:{lgg_contrast(sample.path)}" if is_lgg(sample) else sample.source


def balanced_weights(samples: Sequence[Sample]) -> np.ndarray:
    """Per-sample probabilities (summing to 1) that give every sampling group an equal share."""
    groups = [sampling_group(s) for s in samples]
    counts = Counter(groups)
    weights = np.array([1.0 / (len(counts) * counts[g]) for g in groups], dtype=np.float64)
    normalised: np.ndarray = weights / weights.sum()
    return normalised


def effective_class_counts(labels: Sequence[int], weights: np.ndarray, n_classes: int) -> np.ndarray:
    """Expected images per class in one epoch of ``len(labels)`` draws with ``weights``."""
    counts: np.ndarray = np.bincount(np.asarray(labels), weights=weights * len(labels), minlength=n_classes)
    return counts


def kaggle_contrast_weights(
    samples: Sequence[Sample], contrasts: Mapping[str, str], *, max_upweight: float = MAX_UPWEIGHT
) -> np.ndarray:
    """Per-sample probabilities (summing to 1) that give the classes of each estimated Kaggle contrast an equal
    share of that contrast's images (``--sampling kaggle_contrast``).

    Why: in the Kaggle set the contrast predicts the label (its tumours are T1, its T2/FLAIR images tumour-free;
    :mod:`triaged.training.contrast_read`), so a tumour-free T1 image is rare there and "T1" can stand in for
    "tumour". Within each contrast every class that holds at least :data:`MIN_CLASS_SHARE` of it gets the same mass,
    which raises the tumour-free T1 images; no image is raised more than ``max_upweight`` times. Each contrast keeps
    its total share, smaller cells (likely images the contrast probe placed wrongly) and every other source keep
    their uniform weight."""
    missing = [s.path for s in samples if s.source == "kaggle" and s.path not in contrasts]
    if missing:
        raise ValueError(f"{len(missing)} Kaggle images have no estimated contrast (first: {missing[0]})")
    cells = Counter((contrasts[s.path], s.label) for s in samples if s.source == "kaggle")
    per_contrast = Counter(contrasts[s.path] for s in samples if s.source == "kaggle")
    # A class with a sliver of a contrast's images may be the probe's errors (about 1 % in cross-validation), not
    # that contrast's class: such cells keep their uniform weight and take no share.
    equalised = {cell for cell, n in cells.items() if n >= MIN_CLASS_SHARE * per_contrast[cell[0]]}
    mass = Counter({contrast: float(n) for contrast, n in per_contrast.items()})
    for cell, n in cells.items():
        if cell not in equalised:
            mass[cell[0]] -= n
    classes = Counter(contrast for contrast, _ in equalised)

    def weight(sample: Sample) -> float:
        if sample.source != "kaggle":
            return 1.0
        cell = (contrasts[sample.path], sample.label)
        if cell not in equalised:
            return 1.0
        return min(mass[cell[0]] / classes[cell[0]] / cells[cell], max_upweight)

    weights = np.array([weight(s) for s in samples], dtype=np.float64)
    normalised: np.ndarray = weights / weights.sum()
    return normalised
