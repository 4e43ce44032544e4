"""Tumour-free runs of tcga_lgg volumes, the series-level specificity probe's input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from triaged.training.data import Sample
from triaged.training.series_eval import balanced_threshold, balanced_threshold_interval
from triaged.training.specificity import card_lines, longest_tumour_free_run, tumour_free_series


def _slice(patient: str, number: int, label: str, *, excluded: bool = False, split: str = "test") -> Sample:
    path = f"tcga_lgg/{patient}/flair/{number:03d}.jpg"
    return Sample(path, "tcga_lgg", label, split, patient, excluded, "next_to_lesion" if excluded else "", False, False)


def test_the_longest_run_skips_lesion_and_excluded_slices() -> None:
    labels = ["notumor"] * 3 + ["glioma"] + ["notumor"] * 5 + ["x"] + ["notumor"] * 4
    samples = [
        _slice("TCGA_HT_0001", i + 1, "notumor" if label == "x" else label, excluded=label == "x")
        for i, label in enumerate(labels)
    ]
    assert longest_tumour_free_run(samples) == (4, 5)
    assert longest_tumour_free_run([_slice("TCGA_HT_0001", 1, "glioma")]) == (0, 0)


def test_runs_shorter_than_a_readable_series_are_left_out() -> None:
    long_run = [_slice("TCGA_HT_0001", i + 1, "notumor") for i in range(9)] + [_slice("TCGA_HT_0001", 10, "glioma")]
    short_run = [_slice("TCGA_HT_0002", i + 1, "notumor") for i in range(3)] + [_slice("TCGA_HT_0002", 4, "glioma")]
    [run] = tumour_free_series(long_run + short_run, "test", min_slices=8)
    assert run.patient == "TCGA_HT_0001" and len(run.samples) == 9
    assert all(s.label == "notumor" for s in run.samples)


def test_the_balanced_threshold_pays_for_false_alarms_but_keeps_the_sensitivity_floor() -> None:
    tumour = np.array([0.2, 0.5, 0.6, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.99])
    free = np.array([0.1, 0.3, 0.4, 0.55, 0.7])
    # 0.8 keeps 7/10 tumour series urgent and all 5 tumour-free runs quiet: the best sum, allowed by a 70 % floor;
    # an 80 % floor makes it 0.6 (8/10, 4/5 quiet)
    assert balanced_threshold(tumour, free, 0.7) == pytest.approx(0.8)
    assert balanced_threshold(tumour, free, 0.8) == pytest.approx(0.6)
    assert balanced_threshold(tumour, free, 0.9) == pytest.approx(0.5)  # 9/10, 3/5 quiet; 0.2 would be 10/10, 1/5
    assert balanced_threshold(tumour, free, 1.0) == pytest.approx(0.2)
    # a refused tumour series (-1) counts as missed and is never a threshold itself
    assert balanced_threshold(np.array([-1.0, 0.9]), np.array([0.1]), 0.5) == pytest.approx(0.9)
    with pytest.raises(ValueError):
        balanced_threshold(tumour, np.array([]), 0.9)


def test_the_balanced_interval_resamples_patients_with_both_kinds_of_series() -> None:
    tumour = [{"patient": f"p{i}", "assessable": True, "urgency": 0.5 + 0.05 * i} for i in range(10)]
    free = [{"patient": f"p{i}", "assessable": True, "urgency": 0.1 + 0.05 * i} for i in range(10)]
    result = balanced_threshold_interval(tumour, free, 0.9, rounds=200)
    assert result["patients"] == 10 and result["rounds"] == 200
    assert result["lo"] <= result["threshold"] <= result["hi"]
    assert result["threshold"] == pytest.approx(0.5)  # 10/10 urgent, 9/10 quiet (0.55 would lose a tumour)


def _run(patient: str, split: str, contrast: str, urgency: float) -> dict[str, object]:
    site = patient.split("_")[1]
    return {"patient": patient, "site": site, "split": split, "contrast": contrast, "assessable": True,
            "urgency": urgency, "urgent": urgency >= 0.4}  # fmt: skip


def test_the_card_section_tables_the_runs_and_prices_the_balanced_rule(tmp_path: Path) -> None:
    assert card_lines(tmp_path) == []
    val_tumour = [{**_run(f"TCGA_HT_{i}", "val", "flair", 0.45 + 0.05 * i)} for i in range(10)]
    test_tumour = [_run(f"TCGA_HT_{i + 10}", "test", "flair", u) for i, u in enumerate((0.42, 0.6, 0.9))]
    runs = [_run(f"TCGA_HT_{i}", "val", "flair", 0.05 * i) for i in range(10)]
    runs += [_run(f"TCGA_HT_{i + 10}", "test", "flair", u) for i, u in enumerate((0.1, 0.43, 0.95))]
    report = {"threshold": 0.4, "series": runs, "contrasts": {"flair": {"series": 13, "assessed": 13, "urgent": 3,
              "specificity": 10 / 13, "ci95": [0.5, 0.9]}}}  # fmt: skip
    (tmp_path / "evaluation").mkdir()
    (tmp_path / "evaluation" / "specificity.json").write_text(json.dumps(report))
    volumes = {"val": {"series": val_tumour}, "test": {"series": test_tumour}}
    (tmp_path / "evaluation" / "evaluation.json").write_text(json.dumps({"volumes": volumes}))
    text = " ".join(line.strip() for line in card_lines(tmp_path))
    assert "| flair | 13 | 13 | 3 | 76.9 % [50.0, 90.0] |" in text
    # balanced on val: 0.45 keeps every tumour series urgent and every tumour-free run quiet
    assert "would be 0.450" in text
    assert "cost 1 of 3 test tumour series and spare 1 of the 2 flagged test tumour-free runs." in text
    assert "Most of those false alarms" not in text
