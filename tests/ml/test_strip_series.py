"""Skull-stripped test series through the daemon path: the per-contrast summary, the card lines, and one real
volume stripped and assessed (needs ../shared/data)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import shared_data
from triaged.ml.inference import Triage
from triaged.training.data import read_manifest
from triaged.training.series_eval import volume_series
from triaged.training.strip_series import SERIES_FILE, assess_stripped, card_lines, summary

SHIPPED = Path(__file__).resolve().parents[2] / "models" / "densenet121-brainmri-v2"


def _row(contrast: str, *, urgent: bool, unstripped_urgent: bool = True, assessable: bool = True) -> dict[str, Any]:
    return {
        "patient": "TCGA_HT_0001",
        "site": "HT",
        "contrast": contrast,
        "slices": 20,
        "assessable": assessable,
        "reason": None if assessable else "no slice contains enough brain (3 of 20)",
        "urgency": 0.9 if urgent else (0.1 if assessable else None),
        "urgent": urgent,
        "label": "glioma",
        "unstripped_urgency": 0.95,
        "unstripped_urgent": unstripped_urgent,
    }


def test_the_summary_counts_urgent_and_refused_series_per_contrast() -> None:
    rows = [
        _row("flair", urgent=True),
        _row("flair", urgent=False),
        _row("t1_pre", urgent=False, assessable=False),
        _row("t1_pre", urgent=False, unstripped_urgent=False),
    ]
    groups = summary(rows)
    assert groups["all"]["series"] == 4 and groups["all"]["urgent"] == 1 and groups["all"]["unstripped_urgent"] == 3
    assert groups["flair"]["urgent"] == 1 and groups["flair"]["series"] == 2
    assert groups["t1_pre"]["not_assessable"] == 1 and groups["t1_pre"]["urgent"] == 0
    low, high = groups["flair"]["ci95"]
    assert low < 0.5 < high


def test_the_card_lines_show_the_table_and_the_reasons(tmp_path: Path) -> None:
    assert card_lines(tmp_path) == []
    rows = [_row("flair", urgent=True), _row("t1_pre", urgent=False, assessable=False)]
    (tmp_path / "evaluation").mkdir()
    report = {"threshold": 0.4, "groups": summary(rows), "series": rows}
    (tmp_path / "evaluation" / SERIES_FILE).write_text(json.dumps(report))
    text = "\n".join(card_lines(tmp_path))
    assert "| all | 2 | 1 | 50.0 % [" in text and "| 1 | 2 |" in text
    assert "Reasons for `not_assessable` on stripped series: no slice contains enough brain." in text


def test_a_real_test_volume_is_stripped_and_assessed_with_its_geometry() -> None:
    data_root = shared_data()
    volumes = [v for v in volume_series(read_manifest(SHIPPED / "manifest.csv"), "test") if v.contrast == "flair"]
    [row] = assess_stripped(Triage(SHIPPED, device="cpu", precision="fp32", threads=2), data_root, volumes[:1])
    assert row["patient"] == volumes[0].patient and row["slices"] == len(volumes[0].samples)
    assert row["unstripped_urgent"] and row["unstripped_urgency"] is not None  # every test FLAIR series is urgent
    assert row["assessable"], row["reason"]  # the in-brain rule judges a stripped head by its own size
    assert row["urgency"] != pytest.approx(row["unstripped_urgency"], abs=1e-6)  # the model saw other pixels
