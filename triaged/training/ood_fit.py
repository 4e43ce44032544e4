"""Fit the multi-layer feature OOD check of a model directory and set its threshold on the unseen site's series.

Why a separate step: the urgency threshold, temperature and weights stay as released; only ``ood.safetensors``
and the ``ood`` block of ``model.json`` change. The statistics come from every other training image (as 1.2.0's
penultimate-layer check), each layer's scale from the validation images, and the threshold from the validation
series of the site that never trained (:data:`~triaged.training.lgg.UNSEEN_SITE`), scored through the daemon's
path (DICOM written, decoded, gated, in-brain slices, median): the nearest thing to the next hospital's anatomical
series. Test series, the release series and synthetic phantoms are only scored afterwards, as checks.

Usage: ``python -m triaged.training.ood_fit MODEL_DIR [--data-root ../shared/data] [--json OUT]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from tqdm import tqdm

from triaged.ml.inference import Predictor, Triage
from triaged.ml.ood import OOD_FILE, PENULTIMATE, FeatureOOD, FeatureTap, LayeredOOD
from triaged.ml.registry import load_model, read_spec, sha256_file, write_spec
from triaged.training.data import Sample, evaluation_samples, read_manifest, training_samples
from triaged.training.dataset import preprocess_files, sample_labels, sample_paths
from triaged.training.lgg import UNSEEN_SITE
from triaged.training.series_eval import VolumeSeries, assess_dicom_files, volume_series, write_volume_series

log = structlog.get_logger()

# The stem (after the first pooling) and the three transition layers: resolution, noise and texture statistics
# that the penultimate features, trained to separate four classes, no longer keep.
DEFAULT_LAYERS = (
    "features.pool0",
    "features.transition1",
    "features.transition2",
    "features.transition3",
    PENULTIMATE,
)
DEFAULT_COMPONENTS = 64
DEFAULT_QUANTILE = 0.99  # of the unseen site's validation series, all three contrasts


def fit_layered_ood(
    predictor: Predictor,
    data_root: Path,
    samples: Sequence[Sample],
    *,
    layers: Sequence[str] = DEFAULT_LAYERS,
    n_components: int = DEFAULT_COMPONENTS,
    cache_dir: Path | None = None,
) -> tuple[LayeredOOD, dict[str, Any]]:
    """One PCA-whitened Mahalanobis space per layer on every other training image; scale = validation median."""
    if list(layers).count(PENULTIMATE) != 1 or layers[-1] != PENULTIMATE:
        raise ValueError(f"layers must end with {PENULTIMATE!r}: {layers}")
    pooled = tuple(layers[:-1])
    saved = predictor.ood_layers
    predictor.ood_layers = pooled
    try:
        train = training_samples(samples, "train")[::2]
        images = preprocess_files(sample_paths(data_root, train), predictor.spec.preprocessing, cache_dir=cache_dir)
        train_features = predictor.features(torch.from_numpy(images.astype(np.float32)))
        labels = np.asarray(sample_labels(train, predictor.spec.classes))
        val = evaluation_samples(samples, "val")[::3]  # a median per layer: a third of the images is plenty
        val_images = preprocess_files(sample_paths(data_root, val), predictor.spec.preprocessing, cache_dir=cache_dir)
        val_features = predictor.features(torch.from_numpy(val_images.astype(np.float32)))
    finally:
        predictor.ood_layers = saved
    spaces, references, start = [], [], 0
    for width in _widths(predictor, pooled):
        stop = start + width
        space = FeatureOOD.fit(train_features[:, start:stop], labels, n_components=n_components)
        spaces.append(space)
        references.append(float(np.median(space.score(val_features[:, start:stop]))))
        start = stop
    ood = LayeredOOD(tuple(layers), tuple(spaces), tuple(references))
    info = {
        "method": "mahalanobis-layers",
        "file": OOD_FILE,
        "layers": list(layers),
        "pooling": "channel mean and standard deviation of each layer's output; the penultimate features as they are",
        "components": n_components,
        "fitted_on": f"{len(labels)} training images (every other)",
        "scaled_on": f"{len(val)} validation images (every third)",
        "layer_references": dict(zip(layers, references, strict=True)),
        "layer_scale": "each layer's distance divided by its median on the validation images",
        "slice_score": "largest normalised layer distance",
        "aggregation": "median over in-brain slices",
        "val_image_score_quantiles": _quantiles(ood.score(val_features)),
    }
    return ood, info


def _widths(predictor: Predictor, pooled: Sequence[str]) -> list[int]:
    """Feature width per layer (2 x channels for a pooled layer), the penultimate width last: one probe pass."""
    size = predictor.spec.preprocessing.input_size
    probe = torch.zeros((1, 1, size, size), device=predictor.placement.device)
    with torch.inference_mode(), FeatureTap(predictor.model, pooled) as tap:
        predictor.model(probe)
    return [int(tap.pooled[name][0].shape[1]) for name in pooled] + [int(tap.features[0].shape[1])]


def _quantiles(scores: np.ndarray) -> dict[str, float]:
    return {str(q): float(np.quantile(scores, q)) for q in (0.5, 0.95, 0.99, 0.995, 1.0)} if scores.size else {}


def series_ood_scores(triage: Triage, data_root: Path, series: Sequence[VolumeSeries]) -> list[dict[str, Any]]:
    """Assess each volume through the daemon's path and keep its OOD score and decision."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="triaged-ood-") as tmp:
        for volume in tqdm(series, desc="series", unit="series"):
            paths = write_volume_series(data_root, volume, Path(tmp) / volume.split / volume.patient / volume.contrast)
            result = assess_dicom_files(triage, paths, cam_top_k=0)
            rows.append(
                {
                    "patient": volume.patient,
                    "site": volume.site,
                    "split": volume.split,
                    "contrast": volume.contrast,
                    "slices": len(volume.samples),
                    "ood_score": result.ood_score,
                    "assessable": result.assessable,
                    "reason": result.reason,
                }
            )
    return rows


def fit_model_dir(
    model_dir: Path,
    data_root: Path,
    *,
    layers: Sequence[str] = DEFAULT_LAYERS,
    n_components: int = DEFAULT_COMPONENTS,
    quantile: float = DEFAULT_QUANTILE,
    cache_dir: Path | None = None,
    device: str = "auto",
    precision: str = "auto",
) -> dict[str, Any]:
    """Fit, write ``ood.safetensors`` and the ``ood`` block of ``model.json``; returns the block and the scores."""
    spec, model = load_model(model_dir)
    samples = read_manifest(model_dir / "manifest.csv")
    predictor = Predictor.build(spec, model, device=device, precision=precision)
    ood, info = fit_layered_ood(
        predictor, data_root, samples, layers=layers, n_components=n_components, cache_dir=cache_dir
    )
    ood.save(model_dir / OOD_FILE)
    info["sha256"] = sha256_file(model_dir / OOD_FILE)
    write_spec(model_dir, dataclasses.replace(spec, ood=info))  # no threshold yet: nothing is refused by OOD
    triage = Triage(model_dir, device=device, precision=precision)
    unseen = [v for v in volume_series(samples, "val") if v.site == UNSEEN_SITE]
    if not unseen:
        raise ValueError(f"no validation series of the unseen site {UNSEEN_SITE}; cannot set the OOD threshold")
    val_rows = series_ood_scores(triage, data_root, unseen)
    scores = np.array([r["ood_score"] for r in val_rows if r["ood_score"] is not None], dtype=np.float64)
    info["threshold"] = float(np.quantile(scores, quantile))
    info["quantile"] = quantile
    info["threshold_rule"] = (
        f"quantile {quantile} of the series scores of the {len(scores)} validation series (FLAIR, T1, T1 post) "
        f"of site {UNSEEN_SITE}, never trained on, assessed through the daemon's path"
    )
    info["unseen_site_val_series_score_quantiles"] = _quantiles(scores)
    write_spec(model_dir, dataclasses.replace(read_spec(model_dir), ood=info))
    log.info("ood_fitted", threshold=round(info["threshold"], 4), series=len(scores), layers=list(layers))
    return {"ood": info, "unseen_site_val_series": val_rows}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    parser.add_argument("--components", type=int, default=DEFAULT_COMPONENTS)
    parser.add_argument("--quantile", type=float, default=DEFAULT_QUANTILE)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write the fitted block and the series scores here")
    args = parser.parse_args(argv)
    if not (args.model_dir / "manifest.csv").is_file():
        parser.error(f"{args.model_dir} has no manifest.csv")
    if not (args.data_root / "tcga_lgg").is_dir():
        parser.error(f"{args.data_root} has no tcga_lgg folder")
    report = fit_model_dir(
        args.model_dir, args.data_root, n_components=args.components, quantile=args.quantile, cache_dir=args.cache_dir
    )
    print(f"OOD threshold {report['ood']['threshold']:.4f} ({report['ood']['threshold_rule']})")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
