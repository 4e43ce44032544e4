"""Series-level aggregation of per-slice probabilities (pure numpy, so it is unit-testable without a model)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

BRAIN_INTENSITY = 0.1


@dataclass(frozen=True)
class SeriesScore:
    urgency: float
    label_index: int
    class_probabilities: np.ndarray
    key_slice_indices: tuple[int, ...]
    slice_scores: np.ndarray


def brain_fraction(images: np.ndarray) -> np.ndarray:
    """Fraction of each preprocessed image (N, 1, S, S) brighter than :data:`BRAIN_INTENSITY` (tissue, not air)."""
    flat = images.reshape(images.shape[0], -1)
    result: np.ndarray = (flat > BRAIN_INTENSITY).mean(axis=1).astype(np.float32)
    return result


def in_brain_mask(fractions: np.ndarray, aggregation: Mapping[str, Any]) -> np.ndarray:
    """Slices with enough tissue: above an absolute floor and a fraction of the series' fullest slice.

    The relative rule drops the skull-and-air edge slices of whole-head volumes; the absolute one drops empty
    slices even in a single-slice series.
    """
    if fractions.size == 0:
        return np.zeros(0, dtype=bool)
    absolute = float(aggregation.get("min_brain_fraction", 0.15))
    relative = float(aggregation.get("relative_brain_fraction", 0.5))
    mask: np.ndarray = (fractions >= absolute) & (fractions >= relative * float(fractions.max()))
    return mask


def neighbour_supported(tumour: np.ndarray, in_brain: np.ndarray, window: int) -> np.ndarray:
    """Each in-brain slice's tumour probability capped by its strongest in-brain neighbour within ``window``.

    A real lesion spans adjacent slices; an isolated high slice is more likely noise. A series with a single
    in-brain slice keeps its own score (nothing to agree with).
    """
    idx = np.flatnonzero(in_brain)
    scores = np.zeros_like(tumour)
    if idx.size == 1 or window <= 0:
        scores[idx] = tumour[idx]
        return scores
    for pos, i in enumerate(idx):
        neighbours = [idx[j] for j in range(max(0, pos - window), min(idx.size, pos + window + 1)) if j != pos]
        scores[i] = min(tumour[i], max(tumour[n] for n in neighbours))
    return scores


def aggregate_series(
    probs: np.ndarray, in_brain: np.ndarray, classes: Sequence[str], aggregation: Mapping[str, Any]
) -> SeriesScore:
    """Series urgency = mean of the top-k neighbour-supported tumour probabilities; label from those slices."""
    if not in_brain.any():
        raise ValueError("no in-brain slices to aggregate")
    no_tumour = list(classes).index("notumor")
    tumour = 1.0 - probs[:, no_tumour]
    scores = neighbour_supported(tumour, in_brain, int(aggregation.get("neighbour_window", 1)))
    k = max(1, min(int(aggregation.get("top_k", 3)), int(in_brain.sum())))
    candidates = np.flatnonzero(in_brain)
    order = candidates[np.argsort(-scores[candidates], kind="stable")]
    key = order[:k]
    summed = probs[key].sum(axis=0)
    return SeriesScore(
        urgency=float(np.clip(scores[key].mean(), 0.0, 1.0)),
        label_index=int(np.argmax(summed)),
        class_probabilities=(summed / summed.sum()).astype(np.float64),
        key_slice_indices=tuple(int(i) for i in order),
        slice_scores=scores,
    )
