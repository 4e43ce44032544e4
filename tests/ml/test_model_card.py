"""The model card's comparison table survives a re-evaluation of the product model alone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from triaged.training.model_card import COMPARISON_FILE, comparison_rows


def _report(accuracy: float) -> dict[str, Any]:
    def metric(value: float) -> dict[str, Any]:
        return {"value": value, "ci95": [value - 0.01, min(1.0, value + 0.01)]}

    test = {"accuracy": metric(accuracy), "macro_auc": metric(0.99), "tumour_vs_notumour": {"auc": metric(0.98)}}
    return {"sets": {"test": test, "clean_test": {**test, "accuracy": metric(accuracy - 0.02)}}}


def test_comparison_is_stored_and_reused_without_compare(random_model_dir: Path, tmp_path: Path) -> None:
    product, other = tmp_path / "product", tmp_path / "other"
    shutil.copytree(random_model_dir, product)
    shutil.copytree(random_model_dir, other)
    (other / "evaluation").mkdir()
    (other / "evaluation" / "evaluation.json").write_text(json.dumps(_report(0.9)))
    assert len(comparison_rows(product, _report(0.95), ())) == 3  # header, rule, the product model
    with_other = comparison_rows(product, _report(0.95), [other])
    assert len(with_other) == 4 and "90.00 % [89.00, 91.00]" in with_other[3]
    stored = json.loads((product / "evaluation" / COMPARISON_FILE).read_text())["models"]
    assert [row["test_accuracy"]["value"] for row in stored] == [0.9]
    again = comparison_rows(product, _report(0.97), ())
    assert again[3] == with_other[3] and "97.00 %" in again[2]
