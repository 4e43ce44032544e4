"""Evaluation (``triaged evaluate``): test split, Kaggle ``clean_test``, calibration, operating points, Grad-CAM
localisation and the real-DICOM release criteria; optionally writes the calibration back into ``model.json``.

Everything that is *chosen* (temperature, thresholds, OOD threshold) is fitted on the validation split only;
the test sets are scored once with those choices. With tcga_lgg volumes in the manifest the urgency threshold is
chosen on the validation series of the site that never trained (:mod:`triaged.training.evaluate_volumes`), and the
``test`` set stays the Kaggle/Cheng test split (comparable with 1.x) while ``lgg_test`` holds the volume slices.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch

from triaged.errors import ModelError
from triaged.ml.cam import CamConfig
from triaged.ml.device import Placement, torch_threads
from triaged.ml.inference import Predictor, Triage, energy_score, softmax
from triaged.ml.networks import cam_layer_candidates
from triaged.ml.ood import OOD, OOD_FILE, FeatureOOD, ood_layers
from triaged.ml.registry import default_aggregation, load_model, load_ood, read_spec, sha256_file, write_spec
from triaged.training.camscore import cheng_mask_path, evenly_spaced, load_masks, score_cams
from triaged.training.data import Sample, evaluation_samples, read_manifest, split_summary, training_samples
from triaged.training.dataset import preprocess_files, sample_labels, sample_paths
from triaged.training.evaluate_volumes import (
    flair_masks,
    flair_pointing_game,
    flair_tumour_rows,
    per_source_table,
    volume_evaluation,
)
from triaged.training.lgg import is_lgg, trained_sites
from triaged.training.metrics import fit_temperature, roc_curve, sensitivity_threshold, youden_threshold
from triaged.training.report import set_report

log = structlog.get_logger()


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    """Knobs of one evaluation run (defaults are what the model card reports)."""

    calibrate: bool = True
    tta: bool = False
    cam_limit: int = 240
    rounds: int = 1000
    release: bool = True
    high_sensitivity: float = 0.995
    ood_quantile: float = 0.995
    cache_dir: Path | None = None
    device: str = "auto"
    precision: str = "auto"
    threads: int | None = None
    compare: tuple[Path, ...] = ()
    select_cam: bool = True


def _logits(predictor: Predictor, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return predictor.logits_and_features(torch.from_numpy(images.astype(np.float32)))


def _fit_ood(
    predictor: Predictor, data_root: Path, samples: list[Sample], val_features: np.ndarray, options: EvalOptions
) -> tuple[FeatureOOD, dict[str, Any]]:
    """Fit the feature-space OOD model on (every other) training image; threshold = validation quantile."""
    train = training_samples(samples, "train")
    images = preprocess_files(
        sample_paths(data_root, train), predictor.spec.preprocessing, cache_dir=options.cache_dir
    )[::2]
    features = predictor.features(torch.from_numpy(images.astype(np.float32)))
    ood = FeatureOOD.fit(features, np.asarray(sample_labels(train, predictor.spec.classes))[::2])
    val_scores = ood.score(val_features)
    info = {
        "method": "mahalanobis",
        "file": OOD_FILE,
        "threshold": float(np.quantile(val_scores, options.ood_quantile)),
        "quantile": options.ood_quantile,
        "fitted_on": f"{len(images)} training images",
        "aggregation": "median over in-brain slices",
        "val_score_quantiles": {str(q): float(np.quantile(val_scores, q)) for q in (0.5, 0.95, 0.99, 0.995)},
    }
    return ood, info


def _write_predictions(path: Path, samples: list[Sample], probs: np.ndarray, classes: tuple[str, ...]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["path", "label", "predicted", *[f"p_{c}" for c in classes]])
        for s, p in zip(samples, probs, strict=True):
            writer.writerow([s.path, s.label, classes[int(p.argmax())], *[f"{v:.6f}" for v in p]])


def evaluate_model(model_dir: Path, data_root: Path, out_dir: Path, options: EvalOptions) -> dict[str, Any]:
    """Evaluate ``model_dir``; writes JSON, Markdown, CSV and PNGs to ``out_dir`` and returns the report."""
    from triaged.training.evaluate_outputs import example_grid, write_outputs  # plots/markdown only needed here

    out_dir.mkdir(parents=True, exist_ok=True)
    spec, model = load_model(model_dir)
    manifest_path = model_dir / "manifest.csv"
    if not manifest_path.is_file():
        raise ModelError(f"{model_dir} has no manifest.csv; cannot tell which images are unseen")
    manifest_sha = sha256_file(manifest_path)
    if spec.extra.get("data_manifest_sha256") not in (None, manifest_sha):
        raise ModelError(f"{manifest_path} does not match data_manifest_sha256 in model.json")
    samples = read_manifest(manifest_path)
    with torch_threads(options.threads):
        predictor = Predictor.build(spec, model, device=options.device, precision=options.precision)
    predictor.flip_tta = options.tta  # evaluated as asked; --calibrate records it so the daemon does the same
    # A multi-layer OOD check is fitted by triaged.training.ood_fit (its threshold needs the unseen site's series
    # through the daemon path); evaluation keeps and reports it. 1.x's penultimate-layer check is refitted here.
    kept_ood = load_ood(model_dir, spec) if spec.ood.get("method") == "mahalanobis-layers" else None
    predictor.ood_layers = ood_layers(kept_ood)
    log.info(
        "evaluate_start",
        model=spec.name,
        device=predictor.placement.device,
        precision=predictor.placement.precision,
        tta=options.tta,
    )
    classes = spec.classes
    all_test = evaluation_samples(samples, "test")
    sets = {
        "val": evaluation_samples(samples, "val"),
        "test": [s for s in all_test if not is_lgg(s)],
        "lgg_test": [s for s in all_test if is_lgg(s)],
    }
    sets["clean_test"] = [s for s in sets["test"] if s.clean_test]
    sets["clean_test_not_cheng"] = [s for s in sets["clean_test"] if not s.in_cheng]
    images: dict[str, np.ndarray] = {}
    features: dict[str, np.ndarray] = {}
    logits: dict[str, np.ndarray] = {}
    labels: dict[str, np.ndarray] = {}
    with torch_threads(options.threads):
        for name in ("val", "test", "lgg_test"):
            if not sets[name]:
                continue
            images[name] = preprocess_files(
                sample_paths(data_root, sets[name]), spec.preprocessing, cache_dir=options.cache_dir
            )
            logits[name], features[name] = _logits(predictor, images[name])
            labels[name] = np.asarray(sample_labels(sets[name], classes))
    index = {s.path: i for i, s in enumerate(sets["test"])}
    for name in ("clean_test", "clean_test_not_cheng"):
        rows = [index[s.path] for s in sets[name]]
        logits[name], labels[name] = logits["test"][rows], labels["test"][rows]
    temperature = fit_temperature(logits["val"], labels["val"]) if options.calibrate else spec.temperature
    nt = list(classes).index("notumor")
    val_probs = softmax(logits["val"] / temperature)
    val_tumour = (labels["val"] != nt).astype(int)
    thresholds = {
        "youden": youden_threshold(val_tumour, 1.0 - val_probs[:, nt]),
        "high_sensitivity": sensitivity_threshold(val_tumour, 1.0 - val_probs[:, nt], options.high_sensitivity),
    }
    val_energy = energy_score(logits["val"])
    ood_model: OOD
    if kept_ood is not None:
        ood_model, ood = kept_ood, dict(spec.ood)
    else:
        with torch_threads(options.threads):
            ood_model, ood = _fit_ood(predictor, data_root, samples, features["val"], options)
    ood["test_score_median"] = float(np.median(ood_model.score(features["test"])))
    report: dict[str, Any] = {
        "model": {
            "name": spec.name,
            "version": spec.version,
            "arch": spec.arch,
            "weights_sha256": spec.weights_sha256,
            "data_manifest_sha256": manifest_sha,
            "input_size": spec.preprocessing.input_size,
        },
        "device": {"device": predictor.placement.device, "precision": predictor.placement.precision},
        "tta": options.tta,
        "temperature": temperature,
        "thresholds": thresholds,
        "ood": ood,
        "sets": {},
    }
    for name in ("val", "test", "clean_test", "clean_test_not_cheng", "lgg_test"):
        if (
            name not in labels or len(labels[name]) < 2 or len(np.unique(labels[name])) < 2
        ):  # nothing meaningful to report
            continue
        probs = softmax(logits[name] / temperature)
        report["sets"][name] = set_report(
            probs, labels[name], classes, thresholds, rounds=options.rounds, uncalibrated=softmax(logits[name])
        )
        _write_predictions(out_dir / f"predictions_{name}.csv", sets[name], probs, classes)
    report["precision_parity"] = _precision_parity(predictor, images["test"][:300], temperature)
    report["roc"] = _roc_curves(softmax(logits["test"] / temperature), labels["test"], classes)
    if options.select_cam:
        cam_choice, report["gradcam_selection_on_val"] = _select_cam(
            predictor, data_root, sets["val"], images["val"], labels["val"], rounds=options.rounds
        )
    else:  # keep the layer and method model.json already names (e.g. chosen for the model it continued from)
        cam_choice, report["gradcam_selection_on_val"] = predictor.cam_config, []
    predictor.cam_config = cam_choice
    report["gradcam"], cam_examples = _cam_report(
        predictor, data_root, sets["test"], images["test"], labels["test"], options=options
    )
    if "lgg_test" in images:
        report["gradcam_flair"] = flair_pointing_game(
            predictor,
            data_root,
            sets["lgg_test"],
            images["lgg_test"],
            labels["lgg_test"],
            limit=options.cam_limit,
            rounds=options.rounds,
        )
    urgency_threshold = float(spec.thresholds.get("urgency", thresholds["high_sensitivity"]))
    if options.calibrate:
        if kept_ood is None:
            ood_model.save(model_dir / OOD_FILE)
            ood["sha256"] = sha256_file(model_dir / OOD_FILE)
        urgency_threshold = thresholds["high_sensitivity"]
        new_spec = dataclasses.replace(
            spec,
            temperature=temperature,
            ood=ood,
            aggregation={
                **default_aggregation(spec.preprocessing.input_size),
                **{k: spec.aggregation[k] for k in ("top_k", "neighbour_window") if k in spec.aggregation},
            },
            thresholds={"urgency": urgency_threshold, **thresholds},
            extra={
                **spec.extra,
                "data_split": split_summary(samples),
                "cam": cam_choice.to_dict(),
                "inference": {**dict(spec.extra.get("inference", {})), "flip_tta": options.tta},
            },
        )
        write_spec(model_dir, new_spec)
    if any(is_lgg(s) for s in samples):
        triage = Triage(model_dir, device=options.device, precision=options.precision, threads=options.threads)
        urgency_threshold, report["volumes"] = volume_evaluation(
            triage, data_root, samples, choose=options.calibrate, threshold=urgency_threshold
        )
        thresholds["series_unseen_site"] = urgency_threshold
    report["thresholds"] = thresholds
    report["urgency_threshold"] = urgency_threshold
    if "lgg_test" in logits:
        source_samples = sets["test"] + sets["lgg_test"]
        source_probs = np.concatenate([softmax(logits[n] / temperature) for n in ("test", "lgg_test")])
        report["per_source"] = per_source_table(
            source_samples, source_probs, classes, urgency_threshold, trained_sites(samples)
        )
    if options.calibrate:
        final = dataclasses.replace(
            new_spec,
            thresholds={"urgency": urgency_threshold, **thresholds},
            extra={**new_spec.extra, "metrics": _headline(report)},
        )
        write_spec(model_dir, final)
    if options.release and (data_root / "dicom").is_dir():
        _release(model_dir, data_root, report, options)
    report["ood_check"] = {
        "val_energy_quantiles": {str(q): float(np.quantile(val_energy, q)) for q in (0.5, 0.95, 0.995)},
        "test_energy_median": float(np.median(energy_score(logits["test"]))),
    }
    test_probs = softmax(logits["test"] / temperature)
    tiles = example_grid(predictor, images["test"], test_probs, labels["test"], thresholds["high_sensitivity"])
    write_outputs(out_dir, report, classes, cam_examples, tiles)
    (out_dir / "evaluation.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    if options.calibrate:
        from triaged.training.model_card import write_model_card

        write_model_card(model_dir, report, options.compare)
    log.info("evaluate_done", out_dir=str(out_dir), **_headline(report))
    return report


def _release(model_dir: Path, data_root: Path, report: dict[str, Any], options: EvalOptions) -> None:
    """Run the real-DICOM release criteria into ``report`` (and the volume criteria, when volumes were scored)."""
    from triaged.training.release import evaluate_release, volume_release

    triage = Triage(model_dir, device=options.device, precision=options.precision, threads=options.threads)
    report["release"] = evaluate_release(triage, data_root / "dicom")
    if "volumes" in report:
        report["release"]["volumes"] = volume_release(report["volumes"]["test"])
        report["release"]["passed"] = report["release"]["passed"] and report["release"]["volumes"]["passed"]


def refresh_release(model_dir: Path, data_root: Path, out_dir: Path, options: EvalOptions) -> dict[str, Any]:
    """Re-run only the release criteria against a stored ``evaluation.json``, then rewrite it, ``evaluation.md``
    and (with ``options.calibrate``) the model card.

    For a change in how the daemon reads a series (e.g. the axial reformat of 3-D volumes) that leaves every
    slice score, threshold and volume result of the full evaluation as it was: hours of CPU saved, and the
    card says which numbers came from which run.
    """
    from triaged.training.evaluate_outputs import markdown

    stored = out_dir / "evaluation.json"
    if not stored.is_file():
        raise ModelError(f"{stored} does not exist; run the full evaluation first")
    if not (data_root / "dicom").is_dir():
        raise ModelError(f"{data_root / 'dicom'} does not exist; the release criteria need it")
    report: dict[str, Any] = json.loads(stored.read_text())
    _release(model_dir, data_root, report, options)
    stored.write_text(json.dumps(report, indent=1, default=float) + "\n")
    spec = read_spec(model_dir)
    (out_dir / "evaluation.md").write_text(markdown(report, spec.classes))
    if options.calibrate:
        from triaged.training.model_card import write_model_card

        write_model_card(model_dir, report, options.compare)
    log.info("release_refreshed", out_dir=str(out_dir), passed=report["release"]["passed"])
    return report


def _precision_parity(predictor: Predictor, images: np.ndarray, temperature: float) -> dict[str, Any]:
    """How much the chosen inference precision (e.g. bf16 autocast) changes calibrated outputs vs fp32."""
    x = torch.from_numpy(images.astype(np.float32))
    fast = softmax(predictor.logits(x) / temperature)
    reference = Predictor(predictor.spec, predictor.model, Placement(predictor.placement.device, "fp32"))
    exact = softmax(reference.logits(x) / temperature)
    return {
        "precision": predictor.placement.precision,
        "n": len(images),
        "argmax_agreement": float((fast.argmax(1) == exact.argmax(1)).mean()) if len(images) else float("nan"),
        "max_abs_probability_difference": float(np.abs(fast - exact).max()) if len(images) else float("nan"),
    }


def _headline(report: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ("test", "clean_test"):
        if name not in report["sets"]:
            continue
        s = report["sets"][name]
        out[f"{name}_accuracy"] = s["accuracy"]["value"]
        out[f"{name}_macro_auc"] = s["macro_auc"]["value"]
        out[f"{name}_ece"] = s["ece"]["value"]
        hs = s["tumour_vs_notumour"]["high_sensitivity"]
        out[f"{name}_tumour_sensitivity"] = hs["sensitivity"]["value"]
        out[f"{name}_tumour_specificity"] = hs["specificity"]["value"]
    return out


def _roc_curves(probs: np.ndarray, labels: np.ndarray, classes: tuple[str, ...]) -> dict[str, Any]:
    nt = list(classes).index("notumor")
    curves = {"tumour_vs_notumour": roc_curve((labels != nt).astype(int), 1.0 - probs[:, nt])}
    for i, c in enumerate(classes):
        curves[c] = roc_curve((labels == i).astype(int), probs[:, i])
    return {k: {"fpr": v[0].tolist(), "tpr": v[1].tolist()} for k, v in curves.items()}


def _cheng_masks(data_root: Path, samples: list[Sample], rows: list[int], size: int) -> np.ndarray:
    return load_masks([cheng_mask_path(data_root, samples[i].path) for i in rows], size)


def _cheng_rows(samples: list[Sample], limit: int) -> list[int]:
    return evenly_spaced([i for i, s in enumerate(samples) if s.source == "cheng"], limit)


CAM_SELECTION_SLICES = 96  # per masked source: validation Cheng slices, validation tcga_lgg FLAIR tumour slices


def _select_cam(
    predictor: Predictor, data_root: Path, val: list[Sample], images: np.ndarray, labels: np.ndarray, *, rounds: int
) -> tuple[CamConfig, list[dict[str, Any]]]:
    """Choose the Grad-CAM layer, method and à trous factor on *validation* slices with tumour masks: Cheng
    (post-contrast T1) and, where the split has them, tcga_lgg FLAIR; by the mean of the sources' pointing games,
    then of their IoUs. Why both: on Cheng alone one slice of 96 decided between Grad-CAM and Grad-CAM++, and the
    method it picked can point at FLAIR lesions far less often; the daemon explains both kinds of series.

    Ties keep the earlier, cheaper candidate (plain before denser grids).
    """
    size = predictor.spec.preprocessing.input_size
    masked: list[tuple[str, list[int], np.ndarray]] = []
    cheng = _cheng_rows(val, CAM_SELECTION_SLICES)
    if cheng:
        masked.append(("cheng", cheng, _cheng_masks(data_root, val, cheng, size)))
    flair = flair_tumour_rows(val, CAM_SELECTION_SLICES)
    if flair:
        masked.append(("tcga_lgg_flair", flair, flair_masks(data_root, val, flair, size)))
    # each source's images once, not once per candidate
    sources = [
        (name, torch.from_numpy(images[rows].astype(np.float32)), labels[rows].tolist(), masks)
        for name, rows, masks in masked
    ]
    if not sources:
        return predictor.cam_config, []
    table: list[dict[str, Any]] = []
    for layer, atrous in cam_layer_candidates(predictor.spec.arch):
        for method in ("gradcam", "gradcampp"):
            by_source: dict[str, dict[str, float]] = {}
            for name, x, targets, masks in sources:
                rep, _ = score_cams(
                    predictor.model, x, targets, masks, layer, method=method, atrous=atrous, rounds=rounds
                )
                by_source[name] = {"pointing_game": rep["pointing_game"]["value"], "mean_iou": rep["mean_iou"]["value"]}
            table.append(
                {
                    "target_layer": layer,
                    "method": method,
                    "atrous": atrous,
                    "pointing_game": float(np.mean([v["pointing_game"] for v in by_source.values()])),
                    "mean_iou": float(np.mean([v["mean_iou"] for v in by_source.values()])),
                    "n": sum(len(targets) for _, _, targets, _ in sources),
                    "by_source": by_source,
                }
            )
    best = max(table, key=lambda r: (r["pointing_game"], r["mean_iou"]))
    return CamConfig(str(best["target_layer"]), str(best["method"]), int(best["atrous"])), table


def _cam_report(
    predictor: Predictor,
    data_root: Path,
    test: list[Sample],
    images: np.ndarray,
    labels: np.ndarray,
    *,
    options: EvalOptions,
) -> tuple[dict[str, Any], dict[str, Any]]:
    rows = _cheng_rows(test, options.cam_limit)
    mask_arr = _cheng_masks(data_root, test, rows, predictor.spec.preprocessing.input_size)
    x = torch.from_numpy(images[rows].astype(np.float32))
    choice = predictor.cam_config
    report: dict[str, Any] = {}
    cams: dict[str, np.ndarray] = {}
    for method in ("gradcam", "gradcampp"):
        report[method], cams[method] = score_cams(
            predictor.model,
            x,
            labels[rows].tolist(),
            mask_arr,
            choice.target_layer,
            method=method,
            atrous=choice.atrous,
            rounds=options.rounds,
        )
        report[method]["target_layer"] = choice.target_layer
        report[method]["atrous"] = choice.atrous
    examples = {
        "images": images[rows][:, 0].astype(np.float32),
        "cams": cams[choice.method],
        "masks": mask_arr,
        "labels": labels[rows],
        "paths": [test[i].path for i in rows],
    }
    return report, examples
