"""The generalisation levers of model 2.0, compared on validation at an equal training budget.

``python -m triaged.training.levers --out-dir DIR`` trains one short run per lever (the same number of optimiser
steps and images for each, on the shipped model's data split), evaluates each on the validation split only
(never test), and writes ``levers.json`` and ``levers.md``. Each arm's directory is kept, so an interrupted study
resumes where it stopped and a finished arm is never trained twice.

Why an equal *step* budget, not an equal wall-clock one: the machine is shared, and a lever must not look better
because its run happened to get more CPU. The budget is small (a few thousand images), so the table ranks levers
by how much they move a model in that budget; it is not what each lever would give in a full run.

The columns that matter most are those of the unseen site (tcga_lgg HT validation patients: a site no arm trains
on), because the held-back evaluation is on sites and sources none of our data comes from.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from tqdm import tqdm

from triaged.ml.inference import Predictor
from triaged.ml.registry import DEFAULT_CLASSES, NO_TUMOUR
from triaged.training.data import Sample, evaluation_samples, read_manifest
from triaged.training.dataset import preprocess_files, sample_labels, sample_paths
from triaged.training.lgg import UNSEEN_SITE, is_lgg, lgg_contrast, lgg_patient, lgg_site
from triaged.training.metrics import cluster_resamples, expected_calibration_error, roc_auc, roc_curve
from triaged.training.train import TrainConfig, train

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "models" / "densenet121-brainmri-v2"
EARLIER = REPO / "models" / "densenet121-brainmri-v1"
SPECIFICITY = 0.95
COMPARISON_BATCH = 128  # images per forward pass when a comparison scores a model


@dataclass(frozen=True)
class Arm:
    """One lever setting: a name, what it changes against the baseline, and the TrainConfig overrides."""

    name: str
    change: str
    overrides: dict[str, Any] = field(default_factory=dict)
    model_dir: Path | None = None  # an existing model evaluated as it is (no training): the reference row


def arms() -> list[Arm]:
    """The arms in the order they run (most informative first, so a study cut short still answers most).

    They name 2.0.0, the shipped model when the study ran (its table in the card is against 2.0.0); run again, they
    continue from and compare with whatever model is shipped at :data:`SHIPPED` now."""
    cont = {"init": f"model:{SHIPPED}", "lr": 1e-4}
    return [
        Arm("shipped_2.0.0", "2.0.0 as shipped, not trained further (reference)", model_dir=SHIPPED),
        Arm("baseline", "2.0.0's recipe, continued from 2.0.0", cont),
        Arm("balanced", "source- and contrast-balanced sampling", {**cont, "sampling": "balanced"}),
        Arm(
            "scanner_aug",
            "scanner/export augmentation (JPEG, resampling, Gibbs, Rician)",
            {**cont, "augment": "scanner"},
        ),
        Arm(
            "cam_cheng_only",
            "attention loss on Cheng masks only (no LGG FLAIR masks)",
            {**cont, "cam_mask_sources": "cheng"},
        ),
        Arm(
            "from_1.2.0",
            "continued from 1.2.0 instead of 2.0.0 (2.0.0's own start)",
            {"init": f"model:{EARLIER}", "lr": 3e-4},
        ),
        Arm("size160", "input 160 px instead of 128", {**cont, "input_size": 160}),
        Arm("fresh", "random initialisation", {"init": None, "lr": 1e-3}),
    ]


def base_config(data_root: Path, out_dir: Path, steps: int, seed: int) -> TrainConfig:
    """The shared recipe: 2.0.0's settings (attention loss 0.3, label smoothing, AdamW), the shipped split."""
    return TrainConfig(
        data_root=data_root,
        out_dir=out_dir,
        epochs=1,
        max_steps=steps,
        warmup_epochs=0.05,
        cam_loss_weight=0.3,
        seed=seed,
        manifest=SHIPPED / "manifest.csv",
        model_version="0.0.0-lever",
        validate=False,  # each arm is evaluated once, below, on the whole validation split
    )


def defined_auc(labels: np.ndarray, score: np.ndarray) -> float | None:
    """The AUC, or None (JSON null) where it is undefined: a group with one class only."""
    auc = roc_auc(labels, score)
    return None if np.isnan(auc) else auc


def sensitivity_at_specificity(labels: np.ndarray, score: np.ndarray, specificity: float) -> float | None:
    """Tumour sensitivity at the ROC point whose specificity is at least ``specificity`` (threshold-free)."""
    if not 0 < labels.sum() < len(labels):
        return None
    fpr, tpr, _ = roc_curve(labels, score)
    ok = fpr <= 1.0 - specificity + 1e-12  # 1 - 0.9 is 0.0999…: an fpr of exactly 0.1 must count
    return float(tpr[ok].max()) if ok.any() else 0.0


def validation_metrics(samples: Sequence[Sample], probs: np.ndarray) -> dict[str, float | None]:
    """Per-source accuracy, tumour AUC (1 − p(no tumour)) and calibration on validation images."""
    classes = list(DEFAULT_CLASSES)
    labels = np.array(sample_labels(samples, classes))
    tumour = (labels != classes.index(NO_TUMOUR)).astype(np.int64)
    score = 1.0 - probs[:, classes.index(NO_TUMOUR)]
    public = np.array([not is_lgg(s) for s in samples])
    kaggle = np.array([s.source == "kaggle" for s in samples])
    site = np.array([lgg_site(s.path) if is_lgg(s) else "" for s in samples])
    contrast = np.array([lgg_contrast(s.path) if is_lgg(s) else "" for s in samples])
    unseen, seen = site == UNSEEN_SITE, (site != "") & (site != UNSEEN_SITE)
    out: dict[str, float | None] = {
        "public_acc": float((probs[public].argmax(1) == labels[public]).mean()),
        "public_ece": expected_calibration_error(probs[public], labels[public])[0],
        "kaggle_tumour_auc": defined_auc(tumour[kaggle], score[kaggle]),
        "lgg_seen_auc": defined_auc(tumour[seen], score[seen]),
        "lgg_unseen_auc": defined_auc(tumour[unseen], score[unseen]),
        "lgg_unseen_sens_at_95spec": sensitivity_at_specificity(tumour[unseen], score[unseen], SPECIFICITY),
    }
    for c in ("flair", "t1_pre", "t1_post"):
        sel = unseen & (contrast == c)
        out[f"lgg_unseen_auc_{c}"] = defined_auc(tumour[sel], score[sel])
    return out


def paired_unseen_delta(
    samples: Sequence[Sample],
    probs: np.ndarray,
    baseline: np.ndarray,
    *,
    rounds: int = 1000,
    seed: int = 0,
    rows: Sequence[int] | None = None,
) -> dict[str, float]:
    """Unseen-site slice AUC of an arm minus the baseline's, with a 95 % CI from a paired bootstrap over
    *patients* (slices of one patient are correlated, so resampling slices would make the CI far too narrow).
    ``rows`` picks other tcga_lgg images than the unseen site's axial slices (their reformats, for example)."""
    no_tumour = list(DEFAULT_CLASSES).index(NO_TUMOUR)
    if rows is None:
        rows = [i for i, s in enumerate(samples) if is_lgg(s) and lgg_site(s.path) == UNSEEN_SITE]
    tumour = np.array([samples[i].label != NO_TUMOUR for i in rows], dtype=np.int64)
    arm_score, base_score = 1.0 - probs[rows, no_tumour], 1.0 - baseline[rows, no_tumour]
    patients = np.array([lgg_patient(samples[i].path) for i in rows])
    n_patients, resamples = cluster_resamples(patients, rounds, seed)
    deltas = []
    for pick in resamples:
        d = roc_auc(tumour[pick], arm_score[pick]) - roc_auc(tumour[pick], base_score[pick])
        if np.isfinite(d):
            deltas.append(d)
    value = roc_auc(tumour, arm_score) - roc_auc(tumour, base_score)
    lo, hi = (float(np.quantile(deltas, 0.025)), float(np.quantile(deltas, 0.975))) if deltas else (np.nan, np.nan)
    return {"value": float(value), "lo": lo, "hi": hi, "patients": n_patients}


def format_delta(delta: dict[str, float] | None, missing: str = "–") -> str:
    """A paired Δ AUC with its 95 % CI, as the tables and the console print it."""
    return f"{delta['value']:+.3f} [{delta['lo']:+.3f}, {delta['hi']:+.3f}]" if delta else missing


def auc_cell(value: float | None) -> str:
    """An AUC in a markdown table; an undefined one (a group with one class) as a dash."""
    return "–" if value is None else f"{value:.3f}"


def card_table_section(
    model_dir: Path,
    card_file: str,
    heading: str,
    intro: Sequence[str],
    table: Callable[[list[dict[str, Any]]], str],
) -> list[str]:
    """A model-card section from a comparison tool's JSON kept in ``MODEL_DIR/evaluation`` (none if absent)."""
    path = model_dir / "evaluation" / card_file
    if not path.is_file():
        return []
    rows: list[dict[str, Any]] = json.loads(path.read_text())
    return ["", f"### {heading}", "", *intro, "", *table(rows).splitlines()]


def kept_probabilities(path: Path, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """``compute()``, run once and kept at ``path``, so that a study or comparison resumes where it stopped."""
    if not path.is_file():
        np.save(path, compute())
    probs: np.ndarray = np.load(path)
    return probs


def cached_validation_probabilities(
    path: Path, model_dir: Path, data_root: Path, samples: Sequence[Sample], cache_dir: Path
) -> np.ndarray:
    """:func:`validation_probabilities`, computed once and kept at ``path``."""
    return kept_probabilities(path, lambda: validation_probabilities(model_dir, data_root, samples, cache_dir))


def comparison_predictor(model_dir: Path) -> Predictor:
    """How every comparison scores a model: torch, fp32, on the CPU (temperature 1: softmax of the raw logits)."""
    return Predictor.from_dir(model_dir, device="cpu", precision="fp32", backend="torch")


def batch_probabilities(predictor: Predictor, batches: Iterable[torch.Tensor], total: int, desc: str) -> np.ndarray:
    """Softmax of ``predictor``'s logits over preprocessed batches, concatenated (``total`` batches, for tqdm)."""
    logits = [predictor.logits(batch) for batch in tqdm(batches, total=total, desc=desc, mininterval=10.0)]
    probs: np.ndarray = F.softmax(torch.from_numpy(np.concatenate(logits)), dim=1).numpy()
    return probs


def validation_probabilities(
    model_dir: Path, data_root: Path, samples: Sequence[Sample], cache_dir: Path
) -> np.ndarray:
    """Probabilities of an exported model (:func:`comparison_predictor`) on the validation images."""
    predictor = comparison_predictor(model_dir)
    images = preprocess_files(sample_paths(data_root, samples), predictor.spec.preprocessing, cache_dir=cache_dir)
    starts = range(0, len(images), COMPARISON_BATCH)
    batches = (torch.from_numpy(images[start : start + COMPARISON_BATCH].astype(np.float32)) for start in starts)
    return batch_probabilities(predictor, batches, len(starts), "validate")


def run_study(
    data_root: Path, out_root: Path, steps: int, seed: int, only: Sequence[str] | None
) -> list[dict[str, Any]]:
    """Train every arm not yet trained, evaluate each (probabilities kept per arm) and return their rows."""
    cache_dir = out_root / "cache"
    val = evaluation_samples(read_manifest(SHIPPED / "manifest.csv"), "val")
    for arm in arms():
        if only is not None and arm.name not in only:
            continue
        arm_dir = out_root / arm.name
        arm_dir.mkdir(parents=True, exist_ok=True)
        model_dir = arm.model_dir or arm_dir / "model"
        if arm.model_dir is None and not (model_dir / "model.json").is_file():
            train(replace(base_config(data_root, arm_dir, steps, seed), cache_dir=cache_dir, **arm.overrides))
        probs = cached_validation_probabilities(arm_dir / "val_probs.npy", model_dir, data_root, val, cache_dir)
        history = arm_dir / "history.json"
        row: dict[str, Any] = {
            "arm": arm.name,
            "change": arm.change,
            "overrides": {k: str(v) for k, v in arm.overrides.items()},
            "steps": 0 if arm.model_dir else steps,
            "compute": json.loads(history.read_text())["compute"] if history.is_file() else {"wall_seconds": 0.0},
            **validation_metrics(val, probs),
        }
        baseline_probs = out_root / "baseline" / "val_probs.npy"
        if arm.name != "baseline" and baseline_probs.is_file():
            row["delta_unseen_auc"] = paired_unseen_delta(val, probs, np.load(baseline_probs))
        (arm_dir / "result.json").write_text(json.dumps(row, indent=1, default=str))
        write_table(finished_rows(out_root), out_root)
    return finished_rows(out_root)


def compare_with_shipped(data_root: Path, out_root: Path, models: dict[str, Path]) -> list[dict[str, Any]]:
    """The same validation metrics for finished models (full runs, not lever arms), each with its unseen-site
    Δ AUC against the shipped model (paired bootstrap over patients). Probabilities are kept per model."""
    cache_dir = out_root / "cache"
    val = evaluation_samples(read_manifest(SHIPPED / "manifest.csv"), "val")

    def probabilities(name: str, model_dir: Path) -> np.ndarray:
        return cached_validation_probabilities(out_root / f"{name}_val_probs.npy", model_dir, data_root, val, cache_dir)

    shipped = probabilities("shipped", SHIPPED)
    rows: list[dict[str, Any]] = [{"model": "shipped", "model_dir": str(SHIPPED), **validation_metrics(val, shipped)}]
    for name, model_dir in models.items():
        probs = probabilities(name, model_dir)
        training = json.loads((model_dir / "model.json").read_text()).get("training", {})
        config = training.get("config", {})
        keys: tuple[str, ...] = ("init", "sampling", "augment", "lr", "time_budget_minutes", "seed")
        if config.get("augment") == "strip":
            keys += ("strip_prob", "strip_whole_heads_only")
        if config.get("mixstyle_prob"):
            keys += ("mixstyle_prob",)
        rows.append(
            {
                "model": name,
                "model_dir": str(model_dir),
                "training": {
                    **{k: config.get(k) for k in keys},
                    "epoch": training.get("epoch"),
                    "compute": training.get("compute", {}),
                },
                **validation_metrics(val, probs),
                "delta_unseen_auc_vs_shipped": paired_unseen_delta(val, probs, shipped),
            }
        )
    (out_root / "compare.json").write_text(json.dumps(rows, indent=1, default=str))
    return rows


def finished_rows(out_root: Path) -> list[dict[str, Any]]:
    """Every arm with a result so far, in the order of :func:`arms` (a later ``--arms`` run adds to the table)."""
    results = [out_root / a.name / "result.json" for a in arms()]
    return [json.loads(r.read_text()) for r in results if r.is_file()]


COLUMNS = (
    ("public_acc", "Kaggle+Cheng acc"),
    ("public_ece", "ECE (T=1)"),
    ("kaggle_tumour_auc", "Kaggle tumour AUC"),
    ("lgg_seen_auc", "LGG seen-site AUC"),
    ("lgg_unseen_auc", "LGG unseen-site AUC"),
    ("lgg_unseen_auc_flair", "unseen FLAIR"),
    ("lgg_unseen_auc_t1_pre", "unseen T1"),
    ("lgg_unseen_auc_t1_post", "unseen T1+C"),
    ("lgg_unseen_sens_at_95spec", "unseen sens @95 % spec"),
)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """One row per arm; percentages for accuracy-like columns, three decimals for AUCs."""
    head = "| arm | change | " + " | ".join(title for _, title in COLUMNS) + " | Δ unseen AUC [95 % CI] | min |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 4)]
    for row in rows:
        cells = []
        for key, _ in COLUMNS:
            value = row.get(key)
            cells.append("–" if value is None else f"{value:.3f}" if "auc" in key else f"{100 * value:.1f} %")
        delta = row.get("delta_unseen_auc")
        cells.append(format_delta(delta))
        minutes = float(row["compute"]["wall_seconds"]) / 60
        lines.append(f"| {row['arm']} | {row['change']} | " + " | ".join(cells) + f" | {minutes:.0f} |")
    return "\n".join(lines) + "\n"


def write_table(rows: Sequence[dict[str, Any]], out_root: Path) -> None:
    (out_root / "levers.json").write_text(json.dumps(list(rows), indent=1, default=str))
    (out_root / "levers.md").write_text(markdown_table(rows))


def named_model_dirs(parser: argparse.ArgumentParser, items: Sequence[str]) -> dict[str, Path]:
    """``NAME=MODEL_DIR`` arguments of the comparison tools as a dict; a usage error (not a traceback) otherwise."""
    models: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not (Path(path) / "model.json").is_file():
            parser.error(f"{item!r}: expected NAME=MODEL_DIR with a model.json in MODEL_DIR")
        models[name] = Path(path)
    return models


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m triaged.training.levers", description=__doc__)
    p.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--steps", type=int, default=120, help="optimiser steps per arm (batch 32)")
    p.add_argument("--seed", type=int, default=20310)
    p.add_argument("--arms", default=None, help="comma-separated subset of: " + ", ".join(a.name for a in arms()))
    p.add_argument(
        "--compare",
        nargs="+",
        metavar="NAME=MODEL_DIR",
        help="instead of the study: compare finished model directories with the shipped model on validation",
    )
    ns = p.parse_args(argv)
    if not (ns.data_root / "tcga_lgg").is_dir():
        p.error(f"{ns.data_root} has no tcga_lgg/: the study needs the shared data")
    only = ns.arms.split(",") if ns.arms else None
    unknown = set(only or ()) - {a.name for a in arms()}
    if unknown:
        p.error(f"unknown arm(s): {', '.join(sorted(unknown))}")
    ns.out_dir.mkdir(parents=True, exist_ok=True)
    if ns.compare:
        for row in compare_with_shipped(ns.data_root, ns.out_dir, named_model_dirs(p, ns.compare)):
            shown = format_delta(row.get("delta_unseen_auc_vs_shipped"), "-")
            print(
                f"{row['model']}: unseen AUC {row['lgg_unseen_auc']:.3f}, seen-site AUC {row['lgg_seen_auc']:.3f}, "
                f"unseen sens@95%spec {row['lgg_unseen_sens_at_95spec']:.3f}, Δ unseen AUC vs shipped {shown}"
            )
        return
    rows = run_study(ns.data_root, ns.out_dir, ns.steps, ns.seed, only)
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
