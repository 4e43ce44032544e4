"""Fit the stem-feature OOD check of a model directory and set its threshold on the unseen site's series.

Why a separate step: the urgency threshold, temperature and weights stay as released; only ``ood.safetensors``
and the ``ood`` block of ``model.json`` change. The stem space (channel means and standard deviations after the
first convolution and pooling: resolution, noise and contrast as the network sees them) is fitted on every other
training image; its threshold is a stated quantile of the series scores (median over in-brain slices) of the
validation volumes of the site that never trained (:data:`~triaged.training.lgg.UNSEEN_SITE`), the nearest thing
to the next hospital's anatomical series. The penultimate-layer space and its threshold are kept as released.
Test series, the release series and synthetic phantoms are scored only afterwards, as checks.

Usage: ``python -m triaged.training.ood_fit MODEL_DIR [--data-root ../shared/data] [--json OUT]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch

from triaged.errors import ModelError
from triaged.ml.aggregate import brain_measures, in_brain_mask, relative_signal
from triaged.ml.inference import Predictor
from triaged.ml.ood import OOD_FILE, PENULTIMATE, FeatureOOD, FeatureTap, LayeredOOD
from triaged.ml.registry import load_model, load_ood, sha256_file, write_spec
from triaged.training.data import Sample, read_manifest, training_samples
from triaged.training.dataset import preprocess_files, sample_labels, sample_paths
from triaged.training.lgg import UNSEEN_SITE
from triaged.training.series_eval import VolumeSeries, load_volume, volume_series
from triaged.training.specificity import tumour_free_series

log = structlog.get_logger()

STEM_LAYER = "features.pool0"  # DenseNet121: after conv0, norm0, relu0 and the first max-pool
DEFAULT_QUANTILE = 0.99  # of the unseen site's validation series, all three contrasts


class _StopForwardError(Exception):
    """Raised by a hook once the layers needed are computed: the rest of the network is not run."""


def pooled_features(predictor: Predictor, x: torch.Tensor, layers: Sequence[str], batch: int = 64) -> np.ndarray:
    """Pooled features of ``layers`` (in forward order) under the predictor's precision, stopping after the last."""
    model, out = predictor.model, []

    def stop(*_: object) -> None:
        raise _StopForwardError

    for start in range(0, x.shape[0], batch):
        chunk = x[start : start + batch].to(predictor.placement.device).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), FeatureTap(model, layers) as tap:
            handle = model.get_submodule(layers[-1]).register_forward_hook(stop)
            try:
                with predictor.placement.autocast():
                    model(chunk)
            except _StopForwardError:
                pass
            finally:
                handle.remove()
        out.append(torch.cat([torch.cat(tap.pooled[name]) for name in layers], dim=1))
    result: np.ndarray = torch.cat(out).numpy().astype(np.float32)
    return result


def series_stem_scores(
    predictor: Predictor, space: FeatureOOD, data_root: Path, volumes: Sequence[VolumeSeries], layer: str
) -> list[float]:
    """Median stem distance over each volume's in-brain slices (the daemon's preprocessing and slice selection)."""
    scores = []
    for volume in volumes:
        slices = load_volume(data_root, volume)
        x = predictor.preprocess_slices(slices)
        in_brain = in_brain_mask(brain_measures(x.numpy(), relative_signal(slices)), predictor.spec.aggregation)
        distances = space.score(pooled_features(predictor, x, (layer,)))
        scores.append(float(np.median(distances[in_brain])) if in_brain.any() else float("nan"))
    return scores


def _quantiles(scores: Sequence[float]) -> dict[str, float]:
    a = np.asarray([s for s in scores if np.isfinite(s)], dtype=np.float64)
    return {str(q): float(np.quantile(a, q)) for q in (0.5, 0.9, 0.95, 0.99, 1.0)} if a.size else {}


def fit_model_dir(
    model_dir: Path,
    data_root: Path,
    *,
    layer: str = STEM_LAYER,
    n_components: int | None = None,
    quantile: float = DEFAULT_QUANTILE,
    cache_dir: Path | None = None,
    device: str = "auto",
    precision: str = "auto",
) -> dict[str, Any]:
    """Fit, write ``ood.safetensors`` and the ``ood`` block of ``model.json``; returns the block and the scores."""
    spec, model = load_model(model_dir)
    if spec.ood.get("method") != "mahalanobis":
        raise ModelError(f"{model_dir}: expected a released penultimate-layer ('mahalanobis') OOD block to keep")
    penultimate = load_ood(model_dir, spec)
    if not isinstance(penultimate, FeatureOOD):
        raise ModelError(f"{model_dir}: cannot read its penultimate-layer OOD statistics")
    samples: list[Sample] = read_manifest(model_dir / "manifest.csv")
    predictor = Predictor.build(spec, model, device=device, precision=precision)
    train = training_samples(samples, "train")[::2]
    images = preprocess_files(sample_paths(data_root, train), spec.preprocessing, cache_dir=cache_dir)
    features = pooled_features(predictor, torch.from_numpy(images.astype(np.float32)), (layer,))
    components = n_components or features.shape[1]  # all of them: no truncation to choose
    stem = FeatureOOD.fit(features, np.asarray(sample_labels(train, spec.classes)), n_components=components)
    unseen = [v for v in volume_series(samples, "val") if v.site == UNSEEN_SITE]
    if not unseen:
        raise ValueError(f"no validation series of the unseen site {UNSEEN_SITE}; cannot set the OOD threshold")
    val_scores = series_stem_scores(predictor, stem, data_root, unseen, layer)
    threshold = float(np.quantile([s for s in val_scores if np.isfinite(s)], quantile))
    penultimate_threshold = float(spec.ood["threshold"])
    ood = LayeredOOD((layer, PENULTIMATE), (stem, penultimate), (threshold, penultimate_threshold))
    ood.save(model_dir / OOD_FILE)
    info: dict[str, Any] = {
        "method": "mahalanobis-layers",
        "file": OOD_FILE,
        "layers": [layer, PENULTIMATE],
        "threshold": 1.0,
        "score": "largest, over layers, of the median in-brain slice distance divided by the layer's threshold",
        "layer_thresholds": {layer: threshold, PENULTIMATE: penultimate_threshold},
        "stem": {
            "pooling": "channel mean and standard deviation of the layer's output",
            "components": components,
            "fitted_on": f"{len(train)} training images (every other), nearest of the class centroids",
            "threshold_rule": (
                f"quantile {quantile} of the series scores of the {len(unseen)} validation series (FLAIR, T1, "
                f"T1 post) of site {UNSEEN_SITE}, never trained on"
            ),
            "unseen_site_val_series_score_quantiles": _quantiles(val_scores),
        },
        "penultimate": {
            key: spec.ood[key] for key in ("fitted_on", "quantile", "val_score_quantiles") if key in spec.ood
        },
        "fitted_on": f"{len(train)} training images",
        "quantile": quantile,
        "sha256": sha256_file(model_dir / OOD_FILE),
    }
    info["penultimate"]["threshold_rule"] = "as released: validation image quantile 0.995"
    write_spec(model_dir, dataclasses.replace(spec, ood=info))
    checks = {}
    for split in ("val", "test"):
        volumes = volume_series(samples, split)
        checks[f"{split}_volumes"] = _quantiles(series_stem_scores(predictor, stem, data_root, volumes, layer))
        runs = tumour_free_series(samples, split)
        checks[f"{split}_tumour_free_runs"] = _quantiles(series_stem_scores(predictor, stem, data_root, runs, layer))
    log.info("ood_fitted", stem_threshold=round(threshold, 4), series=len(unseen), layer=layer)
    return {"ood": info, "unseen_site_val_series": val_scores, "stem_score_quantiles": checks}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    parser.add_argument("--quantile", type=float, default=DEFAULT_QUANTILE)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="write the fitted block and the series scores here")
    args = parser.parse_args(argv)
    if not (args.model_dir / "manifest.csv").is_file():
        parser.error(f"{args.model_dir} has no manifest.csv")
    if not (args.data_root / "tcga_lgg").is_dir():
        parser.error(f"{args.data_root} has no tcga_lgg folder")
    report = fit_model_dir(args.model_dir, args.data_root, quantile=args.quantile, cache_dir=args.cache_dir)
    stem = report["ood"]["layer_thresholds"][STEM_LAYER]
    print(f"stem OOD threshold {stem:.4f} ({report['ood']['stem']['threshold_rule']})")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
