"""The daemon's whole-stack preprocessing is bit-identical to the MONAI ``Compose`` applied slice by slice."""

from __future__ import annotations

import warnings

import numpy as np
import torch

from tests.support.pipeline_support import LABELS, kaggle_files, load_slice
from triaged.ml.aggregate import relative_signal
from triaged.ml.transforms import PreprocessingConfig, build_preprocess, preprocess_slice, preprocess_stack


def _per_slice(config: PreprocessingConfig, slices: list[np.ndarray]) -> torch.Tensor:
    compose = build_preprocess(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns on blank slices (maps them to zeros, as the stack path does)
        return torch.stack([preprocess_slice(compose, s) for s in slices])


def test_real_slices_give_the_same_tensor() -> None:
    slices = [load_slice(f) for label in LABELS for f in kaggle_files(label)[:5]]
    assert len({s.shape for s in slices}) > 1  # Kaggle sizes vary: several shape groups in one call
    config = PreprocessingConfig()
    stacked = preprocess_stack(config, slices)
    assert stacked.shape == (len(slices), 1, 128, 128) and stacked.dtype == torch.float32
    assert torch.equal(stacked, _per_slice(config, slices))


def test_edge_cases_give_the_same_tensor() -> None:
    rng = np.random.default_rng(0)
    slices = [
        np.zeros((50, 70), np.float32),  # blank
        np.full((50, 70), 7.0, np.float32),  # constant, not zero
        rng.normal(-300, 40, (50, 70)).astype(np.float32),  # signed data, same shape as the blanks
        rng.normal(100, 30, (90, 40)).astype(np.float32),  # taller than wide
        rng.normal(0, 1, (1001, 1001)).astype(np.float32),  # above MONAI's 1e6-pixel switch to numpy
    ]
    config = PreprocessingConfig(input_size=64, lower_percentile=1.0, upper_percentile=99.0)
    assert torch.equal(preprocess_stack(config, slices), _per_slice(config, slices))
    assert preprocess_stack(config, []).shape == (0, 1, 64, 64)


def test_relative_signal_is_unchanged_by_grouping() -> None:
    rng = np.random.default_rng(1)
    slices = [rng.normal(0, 50, shape).astype(np.float32) for shape in [(40, 40), (30, 50), (40, 40), (30, 50)]]
    level = np.array([float(np.percentile(s, 99)) for s in slices])
    level = level - min(0.0, float(level.min()))
    np.testing.assert_array_equal(relative_signal(slices), (level / np.median(level)).astype(np.float32))
