"""Estimate the contrast of every Kaggle image from the read sample, for contrast-aware sampling (a lever).

The read (:mod:`triaged.training.contrast_read`) showed that in the Kaggle set the contrast predicts the label:
its tumours are T1, its T2 and FLAIR images tumour-free, so 92 % of its T1 images are tumours. A model can learn
"T1 looks like a tumour", and the tumour-free T1 series it flags (tcga_lgg runs, 2-D normal slabs) fit that.
To re-weight the Kaggle images by contrast, every one needs a contrast: a linear discriminant (shrinkage LDA) on
the shipped model's penultimate features, fitted on the read images, tells T1 from fluid-bright or -suppressed
contrasts (T2, FLAIR) and is checked by 5-fold cross-validation on the reads. It learns what a contrast looks
like, not whether an image holds a tumour: the read images' tumour labels never enter it.

Usage: ``python -m triaged.training.contrast_probe MODEL_DIR --out ESTIMATES.csv [--data-root ../shared/data]``;
writes ``path,contrast`` (t1 or fluid) for every Kaggle row of the manifest and prints the cross-validated accuracy.
"""

from __future__ import annotations

import argparse
import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from triaged.ml.inference import Predictor
from triaged.ml.ood import last_linear
from triaged.training.contrast_read import READS_FILE, read_reads
from triaged.training.data import Sample, read_manifest
from triaged.training.dataset import preprocess_files, sample_paths

FLUID = ("t2", "flair")  # fluid-bright (T2) or fluid-suppressed (FLAIR): both T2-weighted, both tumour-free in Kaggle
SHRINKAGE = 0.1  # toward the scaled identity: 1024 features from a few hundred images need it
FOLDS = 5


@dataclass(frozen=True)
class LinearProbe:
    """``features @ weights + bias > 0`` means a fluid contrast (T2 or FLAIR)."""

    weights: np.ndarray
    bias: float

    def is_fluid(self, features: np.ndarray) -> np.ndarray:
        result: np.ndarray = features @ self.weights + self.bias > 0
        return result


def fit_probe(features: np.ndarray, is_fluid: np.ndarray, shrinkage: float = SHRINKAGE) -> LinearProbe:
    """Two-class LDA with a shrunk pooled covariance, the boundary halfway between the class means."""
    if is_fluid.all() or not is_fluid.any():
        raise ValueError("the probe needs images of both contrasts")
    x = features.astype(np.float64)
    mean_fluid, mean_t1 = x[is_fluid].mean(axis=0), x[~is_fluid].mean(axis=0)
    centred = np.concatenate([x[is_fluid] - mean_fluid, x[~is_fluid] - mean_t1])
    covariance = np.atleast_2d(np.cov(centred, rowvar=False))
    scale = np.trace(covariance) / covariance.shape[0]
    covariance = (1 - shrinkage) * covariance + shrinkage * scale * np.eye(covariance.shape[0])
    weights = np.linalg.solve(covariance, mean_fluid - mean_t1)
    return LinearProbe(weights, float(-weights @ (mean_fluid + mean_t1) / 2))


def cross_validated_accuracy(features: np.ndarray, is_fluid: np.ndarray, folds: int = FOLDS, seed: int = 0) -> float:
    """Share of images whose contrast a probe fitted without them gets right."""
    order = np.random.default_rng(seed).permutation(len(is_fluid))
    correct = 0
    for held in np.array_split(order, folds):
        kept = np.setdiff1d(order, held)
        correct += int((fit_probe(features[kept], is_fluid[kept]).is_fluid(features[held]) == is_fluid[held]).sum())
    return correct / len(is_fluid)


def _features(predictor: Predictor, data_root: Path, samples: Sequence[Sample]) -> np.ndarray:
    images = preprocess_files(sample_paths(data_root, samples), predictor.spec.preprocessing)
    features = predictor.features(torch.from_numpy(images.astype(np.float32)))
    return features[:, -last_linear(predictor.model).in_features :]  # the penultimate features come last


def estimate(model_dir: Path, data_root: Path) -> tuple[dict[str, str], float, int]:
    """Estimated contrast of every Kaggle image of the manifest, the probe's cross-validated accuracy on the
    reads, and how many read images it was fitted on."""
    samples = read_manifest(model_dir / "manifest.csv")
    by_path = {s.path: s for s in samples}
    reads = [r for r in read_reads(model_dir / "evaluation" / READS_FILE, samples) if r.contrast in ("t1", *FLUID)]
    predictor = Predictor.from_dir(model_dir, device="cpu", precision="fp32")
    read_features = _features(predictor, data_root, [by_path[r.path] for r in reads])
    is_fluid = np.array([r.contrast in FLUID for r in reads])
    accuracy = cross_validated_accuracy(read_features, is_fluid)
    probe = fit_probe(read_features, is_fluid)
    kaggle = [s for s in samples if s.source == "kaggle"]
    fluid = probe.is_fluid(_features(predictor, data_root, kaggle))
    return {s.path: ("fluid" if f else "t1") for s, f in zip(kaggle, fluid, strict=True)}, accuracy, len(reads)


def read_estimates(path: Path) -> dict[str, str]:
    """``path -> contrast`` as :func:`main` wrote it."""
    with path.open(newline="") as handle:
        return {row["path"]: row["contrast"] for row in csv.DictReader(handle)}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m triaged.training.contrast_probe", description=__doc__)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data-root", type=Path, default=Path(__file__).resolve().parents[3] / "shared" / "data")
    ns = parser.parse_args(argv)
    if not (ns.model_dir / "evaluation" / READS_FILE).is_file():
        parser.error(f"{ns.model_dir / 'evaluation' / READS_FILE} does not exist: the probe is fitted on the reads")
    if not (ns.data_root / "kaggle_4class").is_dir():
        parser.error(f"{ns.data_root / 'kaggle_4class'} does not exist: the probe needs the shared images")
    estimates, accuracy, fitted_on = estimate(ns.model_dir, ns.data_root)
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    with ns.out.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "contrast"])
        writer.writerows(sorted(estimates.items()))
    fluid = sum(1 for c in estimates.values() if c == "fluid")
    print(
        f"probe fitted on {fitted_on} read images, 5-fold accuracy {accuracy:.1%}; "
        f"{fluid} of {len(estimates)} Kaggle images estimated T2/FLAIR; wrote {ns.out}"
    )


if __name__ == "__main__":
    main()
