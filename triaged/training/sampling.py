"""Source- and contrast-balanced sampling (``--sampling balanced``).

Why: Kaggle alone is almost half the training images and nearly all of its ``notumor`` images come from one
source, so uniform sampling lets "looks like that source" stand in for "no tumour". Balanced sampling gives every
(source, contrast) group the same share of each epoch; the class weights of the loss are then computed from the
class mix that sampling produces, so classes are not re-weighted twice.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from triaged.training.data import Sample
from triaged.training.lgg import is_lgg, lgg_contrast


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
