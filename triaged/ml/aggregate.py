"""Series-level aggregation of per-slice probabilities (pure numpy, so it is unit-testable without a model)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

BRAIN_INTENSITY = 0.1
CORNER_RADIUS = 1.45  # |u| + |v| > 1.45 in [-1, 1]² coordinates: four corner triangles, ~15 % of the square


@dataclass(frozen=True)
class SeriesScore:
    urgency: float
    label_index: int
    class_probabilities: np.ndarray
    key_slice_indices: tuple[int, ...]
    slice_scores: np.ndarray


@dataclass(frozen=True)
class BrainMeasures:
    """Per-slice measures of how much head, and how much tissue within it, each preprocessed slice shows.

    ``head``: the head's area as a fraction of the square — pixels inside both the row span and the column span of
    the tissue (so dark skull, ventricles or a resection cavity inside the head count as head). ``tissue_of_head``:
    the share of that area that is tissue. ``corner``: tissue share in the four corners of the square, where a head
    never reaches (a round object) but a field filled by noise or a registration artefact does. ``signal``: each
    slice's raw 99th-percentile intensity over the series' median of it — preprocessing rescales every slice to
    [0, 1], so a slice of noise above the head looks as bright as brain after it; before it, it is far darker.
    """

    head: np.ndarray
    tissue_of_head: np.ndarray
    corner: np.ndarray
    signal: np.ndarray


def relative_signal(raw_slices: Sequence[np.ndarray]) -> np.ndarray:
    """Each raw slice's 99th-percentile intensity divided by the series' median of those (1.0 for a lone slice)."""
    if not raw_slices:
        return np.zeros(0, dtype=np.float32)
    level = np.zeros(len(raw_slices))
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, pixels in enumerate(raw_slices):
        groups.setdefault(np.shape(pixels), []).append(index)
    for indices in groups.values():  # one call per slice shape: the same per-row values, without a loop in Python
        stack = np.stack([np.asarray(raw_slices[i], dtype=np.float32) for i in indices])
        level[indices] = np.percentile(stack.reshape(len(indices), -1), 99, axis=1)
    level = level - min(0.0, float(level.min()))  # signed data: measure from the lowest level, not from zero
    reference = float(np.median(level))
    if reference <= 0:
        return np.ones(len(level), dtype=np.float32)
    result: np.ndarray = (level / reference).astype(np.float32)
    return result


def _span(t: np.ndarray, axis: int) -> np.ndarray:
    """Mask of the pixels between the first and last tissue pixel along ``axis`` (inclusive): tissue seen so far
    from one end and also from the other."""
    from_start = np.logical_or.accumulate(t, axis=axis)
    from_end = np.flip(np.logical_or.accumulate(np.flip(t, axis=axis), axis=axis), axis=axis)
    span: np.ndarray = from_start & from_end
    return span


def head_span(tissue: np.ndarray) -> np.ndarray:
    """The head of boolean tissue masks (..., H, W): pixels inside both the row span and the column span of the
    tissue, so dark skull, ventricles or a cavity inside the head count as head."""
    head: np.ndarray = _span(tissue, -1) & _span(tissue, -2)
    return head


def brain_measures(images: np.ndarray, signal: np.ndarray | None = None) -> BrainMeasures:
    """:class:`BrainMeasures` of preprocessed images (N, 1, S, S); tissue is brighter than :data:`BRAIN_INTENSITY`.

    ``signal`` is :func:`relative_signal` of the raw slices (all ones when unknown, e.g. single training images).
    """
    t = images.reshape(images.shape[0], images.shape[-2], images.shape[-1]) > BRAIN_INTENSITY
    head = head_span(t)
    head_px = head.reshape(len(t), -1).sum(axis=1)
    size = t.shape[-1]
    yy, xx = np.mgrid[0:size, 0:size]
    u, v = (xx - (size - 1) / 2) / (size / 2), (yy - (size - 1) / 2) / (size / 2)
    corner = (np.abs(u) + np.abs(v)) > CORNER_RADIUS
    return BrainMeasures(
        head=(head_px / float(size * size)).astype(np.float32),
        tissue_of_head=(t.reshape(len(t), -1).sum(axis=1) / np.maximum(head_px, 1)).astype(np.float32),
        corner=t[:, corner].mean(axis=1).astype(np.float32),
        signal=np.ones(len(t), dtype=np.float32) if signal is None else np.asarray(signal, dtype=np.float32),
    )


def coarse_matrix_reason(slices: Sequence[np.ndarray], aggregation: Mapping[str, Any]) -> str | None:
    """Why a series' images are too coarse for the model to score, or ``None``.

    ``min_matrix`` is the model's input size: preprocessing resizes the longer side of each image to it, and every
    training image was larger (Kaggle 192 px and up, Cheng 512, tcga_lgg 256), so the model has only ever seen
    downsampled images. A series whose longer side is below it (a 64 x 64 diffusion b0, an 80 x 80 EPI) would be
    upsampled, every pixel interpolated: a resolution and texture it never saw, which its feature-distance check
    does not catch (a stripped 82 x 82 sagittal b0 scored 0.977 pituitary with an in-range distance). The
    metadata gate refuses such series by their headers; this holds when the headers say nothing. Models without
    ``min_matrix`` (1.2.0, test models) are not checked.
    """
    minimum = aggregation.get("min_matrix")
    if minimum is None or not slices:
        return None
    rows, cols = max((np.asarray(s).shape for s in slices), key=max)
    if max(rows, cols) >= int(minimum):
        return None
    return (
        f"image matrix {rows} x {cols} is coarser than the model's {int(minimum)}-pixel input (diffusion/EPI"
        " resolution): it would be upsampled, and no training image was"
    )


def in_brain_mask(measures: BrainMeasures, aggregation: Mapping[str, Any]) -> np.ndarray:
    """Slices that show brain, judged relative to the head so any field of view and skull-stripped volumes pass.

    A slice counts when (0) its raw signal is at least ``min_relative_signal`` of the series' typical slice (not
    noise above or below the head), (1) its field is not filled to the corners (noise, artefact:
    ``max_corner_fraction``),
    (2) it shows some head at all (``min_head_fraction`` of the square, for single-slice series), (3) its head is at
    least ``relative_head_fraction`` of the series' typical head size (the 90th percentile over valid slices, not
    the maximum, so one odd slice cannot push every real one out): this drops the small vertex and skull-base
    edge slices of a whole-head volume, and (4) tissue fills at least ``min_tissue_of_head`` of the head (slices
    through sinuses, orbits and airways are mostly cavity).
    """
    if measures.head.size == 0:
        return np.zeros(0, dtype=bool)
    valid = (measures.corner <= float(aggregation.get("max_corner_fraction", 0.7))) & (
        measures.head >= float(aggregation.get("min_head_fraction", 0.05))
    )
    valid &= measures.tissue_of_head >= float(aggregation.get("min_tissue_of_head", 0.5))
    valid &= measures.signal >= float(aggregation.get("min_relative_signal", 0.3))
    if not valid.any():
        return valid
    typical = float(np.quantile(measures.head[valid], 0.9))
    mask: np.ndarray = valid & (measures.head >= float(aggregation.get("relative_head_fraction", 0.5)) * typical)
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
