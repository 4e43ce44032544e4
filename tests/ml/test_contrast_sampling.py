"""Contrast-aware Kaggle sampling: the probe that estimates each image's contrast, and the weights built on it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from triaged.training.contrast_probe import cross_validated_accuracy, fit_probe, read_estimates
from triaged.training.data import Sample
from triaged.training.sampling import effective_class_counts, kaggle_contrast_weights
from triaged.training.train import TrainConfig, _sampling_weights


def _contrast_features(n_t1: int, n_fluid: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """64-d features whose first coordinate separates the contrasts, with noise everywhere."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(n_t1 + n_fluid, 64))
    is_fluid = np.arange(n_t1 + n_fluid) >= n_t1
    features[:, 0] += np.where(is_fluid, 3.0, -3.0)
    return features, is_fluid


def test_the_probe_separates_contrasts_it_was_not_fitted_on() -> None:
    features, is_fluid = _contrast_features(120, 40)
    probe = fit_probe(features, is_fluid)
    unseen, truth = _contrast_features(60, 20, seed=1)
    assert (probe.is_fluid(unseen) == truth).mean() > 0.95
    assert cross_validated_accuracy(features, is_fluid) > 0.95
    # with the signal removed it can only guess
    assert cross_validated_accuracy(np.random.default_rng(2).normal(size=(160, 64)), is_fluid) < 0.85
    with pytest.raises(ValueError, match="both contrasts"):
        fit_probe(features[:100], is_fluid[:100])


def _kaggle(i: int, label: str) -> Sample:
    return Sample(f"kaggle_4class/{i}.jpg", "kaggle", label, "train", str(i), False, "", False, False)


def _pool() -> tuple[list[Sample], dict[str, str]]:
    """34 T1 images (10 of each tumour class, 4 tumour-free), 20 fluid tumour-free images, 10 tcga_lgg slices."""
    t1 = [_kaggle(i, ("glioma", "meningioma", "pituitary")[i % 3]) for i in range(30)]
    t1 += [_kaggle(30 + i, "notumor") for i in range(4)]
    fluid = [_kaggle(34 + i, "notumor") for i in range(20)]
    lgg = [
        Sample(f"tcga_lgg/p/{i}.jpg", "tcga_lgg", "glioma", "train", "p", False, "", False, False) for i in range(10)
    ]
    contrasts = {s.path: "t1" for s in t1} | {s.path: "fluid" for s in fluid}
    return t1 + fluid + lgg, contrasts


def test_the_classes_of_each_contrast_get_an_equal_share_and_other_sources_are_untouched() -> None:
    samples, contrasts = _pool()
    weights = kaggle_contrast_weights(samples, contrasts)
    assert weights.sum() == pytest.approx(1.0)
    uniform = 1.0 / len(samples)
    share = {
        label: weights[[i for i, s in enumerate(samples[:34]) if s.label == label]].sum()
        for label in ("glioma", "meningioma", "pituitary", "notumor")
    }
    # T1 keeps its 34 images' mass, a quarter to each class: its 4 tumour-free images are drawn 34/16 as often
    assert share["notumor"] == pytest.approx(share["glioma"]) == pytest.approx(share["pituitary"])
    assert sum(share.values()) == pytest.approx(34 * uniform)
    assert weights[30] / uniform == pytest.approx(34 / 4 / 4)
    assert weights[0] / uniform == pytest.approx(34 / 4 / 10)
    assert weights[34:54] == pytest.approx(uniform)  # fluid holds one class: unchanged
    assert weights[54:] == pytest.approx(uniform)  # tcga_lgg unchanged
    labels = [["glioma", "meningioma", "notumor", "pituitary"].index(s.label) for s in samples]
    assert effective_class_counts(labels, weights, 4).sum() == pytest.approx(len(samples))


def test_no_image_is_raised_more_than_the_cap() -> None:
    # 51 T1 tumour images (17 a class) and 3 tumour-free ones (5.6 %): a quarter of 54 on 3 images is 4.5x
    samples = [_kaggle(i, ("glioma", "meningioma", "pituitary")[i % 3]) for i in range(51)]
    samples += [_kaggle(51 + i, "notumor") for i in range(3)]
    samples.append(Sample("cheng/1.jpg", "cheng", "glioma", "train", "c", False, "", False, False))
    weights = kaggle_contrast_weights(samples, dict.fromkeys((s.path for s in samples[:54]), "t1"), max_upweight=4.0)
    assert weights[51] / weights[54] == pytest.approx(4.0)  # capped, against the untouched Cheng slice
    assert weights[0] / weights[54] == pytest.approx(54 / 4 / 17)


def test_a_sliver_of_a_class_in_a_contrast_is_left_alone() -> None:
    samples, contrasts = _pool()
    contrasts["kaggle_4class/0.jpg"] = "fluid"  # a probe error: one glioma among 20 tumour-free fluid images (4.8 %)
    weights = kaggle_contrast_weights(samples, contrasts)
    untouched = weights[54]  # a tcga_lgg slice
    assert weights[0] == pytest.approx(untouched)  # not raised to half of the fluid images' mass
    assert weights[34:54] == pytest.approx(untouched)  # and the fluid tumour-free images keep theirs


def test_an_image_without_an_estimate_is_refused() -> None:
    samples, contrasts = _pool()
    del contrasts["kaggle_4class/3.jpg"]
    with pytest.raises(ValueError, match="1 Kaggle images have no estimated contrast"):
        kaggle_contrast_weights(samples, contrasts)


def test_training_with_kaggle_contrast_needs_the_estimates(tmp_path: Path) -> None:
    samples, contrasts = _pool()
    cfg = TrainConfig(data_root=tmp_path, out_dir=tmp_path, sampling="kaggle_contrast")
    with pytest.raises(ValueError, match="needs --contrast-estimates"):
        _sampling_weights(cfg, samples)
    estimates = tmp_path / "estimates.csv"
    estimates.write_text("path,contrast\n" + "".join(f"{p},{c}\n" for p, c in contrasts.items()))
    assert read_estimates(estimates) == contrasts
    with_file = TrainConfig(
        data_root=tmp_path, out_dir=tmp_path, sampling="kaggle_contrast", contrast_estimates=estimates
    )
    np.testing.assert_allclose(_sampling_weights(with_file, samples), kaggle_contrast_weights(samples, contrasts))
    uniform = TrainConfig(data_root=tmp_path, out_dir=tmp_path)
    np.testing.assert_allclose(_sampling_weights(uniform, samples), 1.0 / len(samples))
