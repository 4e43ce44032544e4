"""Tumour AUC on skull-stripped tcga_lgg validation slices, for finished models (evaluation only).

Skull-stripped volumes (BraTS-style) reach the daemon, and no training image is stripped. Each validation slice
is stripped (:func:`triaged.training.skullstrip.skull_strip`) before the daemon's preprocessing, so the model sees
what a stripped series would give it; AUC per contrast for the seen site (DU) and the unseen one (HT), with the
unseen-site Δ against the shipped model (paired bootstrap over patients). The unstripped metrics of the same
models come from ``python -m triaged.training.levers --compare``.

Usage: ``python -m triaged.training.strip_eval --data-root ../shared/data --out-dir DIR NAME=MODEL_DIR ...``;
writes ``DIR/strip_eval.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from triaged.ml.registry import DEFAULT_CLASSES, NO_TUMOUR
from triaged.ml.transforms import preprocess_stack
from triaged.training.data import Sample, evaluation_samples, read_manifest
from triaged.training.dataset import load_image, sample_labels
from triaged.training.levers import (
    COMPARISON_BATCH,
    SHIPPED,
    auc_cell,
    batch_probabilities,
    card_table_section,
    comparison_predictor,
    defined_auc,
    format_delta,
    kept_probabilities,
    named_model_dirs,
    paired_unseen_delta,
)
from triaged.training.lgg import UNSEEN_SITE, is_lgg, lgg_contrast, lgg_site
from triaged.training.skullstrip import skull_strip

CONTRASTS = ("flair", "t1_pre", "t1_post")


def stripped_probabilities(model_dir: Path, data_root: Path, samples: Sequence[Sample]) -> np.ndarray:
    """Probabilities (scored as in the lever comparison) on the slices, each stripped before preprocessing."""
    predictor = comparison_predictor(model_dir)

    def stripped(chunk: Sequence[Sample]) -> torch.Tensor:
        raw = [skull_strip(torch.from_numpy(load_image(data_root / s.path))).numpy() for s in chunk]
        return torch.as_tensor(preprocess_stack(predictor.spec.preprocessing, raw))

    starts = range(0, len(samples), COMPARISON_BATCH)
    batches = (stripped(samples[start : start + COMPARISON_BATCH]) for start in starts)
    return batch_probabilities(predictor, batches, len(starts), "stripped")


def strip_metrics(samples: Sequence[Sample], probs: np.ndarray) -> dict[str, float | None]:
    """Stripped-slice tumour AUC per site group and contrast."""
    classes = list(DEFAULT_CLASSES)
    tumour = (np.array(sample_labels(samples, classes)) != classes.index(NO_TUMOUR)).astype(np.int64)
    score = 1.0 - probs[:, classes.index(NO_TUMOUR)]
    unseen = np.array([lgg_site(s.path) == UNSEEN_SITE for s in samples])
    contrast = np.array([lgg_contrast(s.path) for s in samples])
    out: dict[str, float | None] = {}
    for group, sel in (("seen", ~unseen), ("unseen", unseen)):
        out[f"stripped_{group}_auc"] = defined_auc(tumour[sel], score[sel])
        for c in CONTRASTS:
            out[f"stripped_{group}_auc_{c}"] = defined_auc(tumour[sel & (contrast == c)], score[sel & (contrast == c)])
    return out


def compare(data_root: Path, out_dir: Path, models: dict[str, Path]) -> list[dict[str, Any]]:
    """Every model's stripped-slice metrics, with its unseen-site Δ AUC against the shipped model."""
    samples = [s for s in evaluation_samples(read_manifest(SHIPPED / "manifest.csv"), "val") if is_lgg(s)]
    out_dir.mkdir(parents=True, exist_ok=True)

    def probabilities(name: str, model_dir: Path) -> np.ndarray:
        path = out_dir / f"{name}_stripped_probs.npy"
        return kept_probabilities(path, lambda: stripped_probabilities(model_dir, data_root, samples))

    shipped = probabilities("shipped", SHIPPED)
    rows: list[dict[str, Any]] = [{"model": "shipped", **strip_metrics(samples, shipped)}]
    for name, model_dir in models.items():
        probs = probabilities(name, model_dir)
        delta = paired_unseen_delta(samples, probs, shipped)
        rows.append({"model": name, **strip_metrics(samples, probs), "delta_stripped_unseen_auc": delta})
    (out_dir / CARD_FILE).write_text(json.dumps(rows, indent=1))
    return rows


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    keys = [f"stripped_{g}_auc" for g in ("seen", "unseen")] + [f"stripped_unseen_auc_{c}" for c in CONTRASTS]
    head = ["model", "seen AUC", "unseen AUC", *(f"unseen {c}" for c in CONTRASTS), "Δ unseen AUC [95 % CI]"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"], *(auc_cell(r[k]) for k in keys), format_delta(r.get("delta_stripped_unseen_auc"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


CARD_FILE = "strip_eval.json"  # this tool's output for the card, copied into MODEL_DIR/evaluation


def card_lines(model_dir: Path) -> list[str]:
    """The model card's section on stripped slices, when ``evaluation/strip_eval.json`` was kept for this model."""
    intro = [
        "`python -m triaged.training.strip_eval`: slice tumour AUC on the tcga_lgg validation slices after a crude",
        "skull strip (`triaged.training.skullstrip`), for the seen site (DU) and the unseen one (HT); Δ against the",
        "first row, paired bootstrap over patients.",
    ]
    return card_table_section(model_dir, CARD_FILE, "Skull-stripped validation slices", intro, markdown_table)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m triaged.training.strip_eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("models", nargs="*", metavar="NAME=MODEL_DIR")
    ns = p.parse_args(argv)
    if not (ns.data_root / "tcga_lgg" / "index.csv").is_file():
        p.error(f"{ns.data_root} has no tcga_lgg/index.csv: pass --data-root pointing at the shared data")
    models = named_model_dirs(p, ns.models)
    print(markdown_table(compare(ns.data_root, ns.out_dir, models)))


if __name__ == "__main__":
    main()
