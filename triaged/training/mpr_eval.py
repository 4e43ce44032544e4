"""Tumour AUC on sagittal and coronal reformats of the validation patients, for finished models (evaluation only).

The lever that adds reformatted training slabs (:mod:`triaged.training.mpr`) is judged where it should act: on
the reformats of validation patients, which no model trains on, per plane and for the seen site (DU) and the
unseen one (HT), against the shipped model with a paired bootstrap over patients. The axial validation metrics
of the same models come from ``python -m triaged.training.levers --compare``.

Usage: ``python -m triaged.training.mpr_eval --derived DERIVED --out-dir DIR NAME=MODEL_DIR ...`` (DERIVED as
written by ``python -m triaged.training.mpr``); writes ``DIR/mpr_eval.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from triaged.ml.registry import DEFAULT_CLASSES, NO_TUMOUR
from triaged.training.data import Sample, evaluation_samples, read_manifest
from triaged.training.dataset import sample_labels
from triaged.training.levers import (
    SHIPPED,
    SPECIFICITY,
    auc_cell,
    cached_validation_probabilities,
    card_table_section,
    defined_auc,
    format_delta,
    named_model_dirs,
    paired_unseen_delta,
    sensitivity_at_specificity,
)
from triaged.training.lgg import UNSEEN_SITE, lgg_site
from triaged.training.mpr import DATASET, PLANES, mpr_plane


def plane_metrics(samples: Sequence[Sample], probs: np.ndarray) -> dict[str, float | None]:
    """Tumour AUC per plane and site group (seen / unseen), and unseen sensitivity at 95 % specificity."""
    classes = list(DEFAULT_CLASSES)
    tumour = (np.array(sample_labels(samples, classes)) != classes.index(NO_TUMOUR)).astype(np.int64)
    score = 1.0 - probs[:, classes.index(NO_TUMOUR)]
    unseen = np.array([lgg_site(s.path) == UNSEEN_SITE for s in samples])
    plane = np.array([mpr_plane(s.path) for s in samples])
    out: dict[str, float | None] = {}
    for p in PLANES:
        for group, sel in (("seen", ~unseen), ("unseen", unseen)):
            out[f"{p}_{group}_auc"] = defined_auc(tumour[sel & (plane == p)], score[sel & (plane == p)])
        sel = unseen & (plane == p)
        out[f"{p}_unseen_sens_at_95spec"] = sensitivity_at_specificity(tumour[sel], score[sel], SPECIFICITY)
    return out


def compare(derived: Path, out_dir: Path, models: dict[str, Path]) -> list[dict[str, Any]]:
    """Every model's plane metrics, with its unseen-site Δ AUC per plane against the shipped model."""
    samples = evaluation_samples(read_manifest(derived / DATASET / "index.csv"), "val")
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = out_dir / "cache"

    def probabilities(name: str, model_dir: Path) -> np.ndarray:
        return cached_validation_probabilities(out_dir / f"{name}_mpr_probs.npy", model_dir, derived, samples, cache)

    shipped = probabilities("shipped", SHIPPED)
    rows: list[dict[str, Any]] = [{"model": "shipped", **plane_metrics(samples, shipped)}]
    for name, model_dir in models.items():
        probs = probabilities(name, model_dir)
        row: dict[str, Any] = {"model": name, **plane_metrics(samples, probs)}
        for p in PLANES:
            picked = [i for i, s in enumerate(samples) if mpr_plane(s.path) == p and lgg_site(s.path) == UNSEEN_SITE]
            row[f"delta_{p}_unseen_auc"] = paired_unseen_delta(samples, probs, shipped, rows=picked)
        rows.append(row)
    (out_dir / "mpr_eval.json").write_text(json.dumps(rows, indent=1))
    return rows


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    head = ["model"] + [f"{p} {g} AUC" for p in PLANES for g in ("seen", "unseen")]
    head += [f"Δ {p} unseen AUC [95 % CI]" for p in PLANES]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["model"]] + [auc_cell(r[f"{p}_{g}_auc"]) for p in PLANES for g in ("seen", "unseen")]
        cells += [format_delta(r.get(f"delta_{p}_unseen_auc")) for p in PLANES]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


CARD_FILE = "mpr_eval.json"  # this tool's output for the card, copied into MODEL_DIR/evaluation


def card_lines(model_dir: Path) -> list[str]:
    """The model card's section on the reformats, when ``evaluation/mpr_eval.json`` was kept for this model."""
    intro = [
        "`python -m triaged.training.mpr_eval`: slice tumour AUC on 4 mm sagittal and coronal slabs reformatted",
        "from the tcga_lgg validation volumes (`python -m triaged.training.mpr`; no model trains on them), for the",
        "seen site (DU) and the unseen one (HT); Δ against the first row, paired bootstrap over patients.",
    ]
    heading = "Sagittal and coronal reformats of the validation patients"
    return card_table_section(model_dir, CARD_FILE, heading, intro, markdown_table)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m triaged.training.mpr_eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--derived", type=Path, required=True, help="data root written by python -m triaged.training.mpr")
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("models", nargs="*", metavar="NAME=MODEL_DIR")
    ns = p.parse_args(argv)
    if not (ns.derived / DATASET / "index.csv").is_file():
        p.error(f"{ns.derived / DATASET} has no index.csv: run python -m triaged.training.mpr --out {ns.derived}")
    models = named_model_dirs(p, ns.models)
    print(markdown_table(compare(ns.derived, ns.out_dir, models)))


if __name__ == "__main__":
    main()
