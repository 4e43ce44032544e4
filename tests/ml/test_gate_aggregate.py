"""Assessability gate and series aggregation (pure functions, no model)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from triaged.ml.aggregate import aggregate_series, brain_fraction, in_brain_mask, neighbour_supported
from triaged.ml.gate import gate_reason
from triaged.ml.results import SeriesMeta

T1 = SeriesMeta(
    "MR",
    "HEAD",
    "t1_mprage_sag",
    "t1_mprage_sag",
    ("ORIGINAL", "PRIMARY", "M", "NORM"),
    ("GR", "IR"),
    ("SP", "MP"),
    (),
    176,
)
CLASSES = ("glioma", "meningioma", "notumor", "pituitary")


@pytest.mark.parametrize(
    "change",
    [
        {},
        {"body_part_examined": ""},
        {"series_description": "AX T2 FLAIR"},
        {"series_description": "T1 POST GAD"},
        {"image_type": ("DERIVED", "PRIMARY", "MPR")},
        {"body_part_examined": "BRAIN"},
    ],
)
def test_anatomical_brain_series_pass(change: dict[str, object]) -> None:
    assert gate_reason(dataclasses.replace(T1, **change)) is None  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"modality": "CT"}, "not MR"),
        ({"body_part_examined": "KNEE"}, "not brain"),
        ({"diffusion_b_values": (0.0, 1000.0)}, "diffusion"),
        ({"scanning_sequence": ("EP",)}, "EPI"),
        ({"series_description": "ep2d_diff_3scan_trace"}, "diffusion"),
        ({"series_description": "ADC"}, "diffusion"),
        ({"series_description": "AAHead_Scout"}, "localizer"),
        ({"series_description": "3-plane loc"}, "localizer"),
        ({"series_description": "ep2d_perf"}, "EPI"),
        ({"series_description": "DSC perfusion"}, "perfusion"),
        ({"image_type": ("ORIGINAL", "PRIMARY", "LOCALIZER")}, "localizer"),
        ({"image_type": ("DERIVED", "PRIMARY", "ADC")}, "diffusion"),
        ({"image_type": ("DERIVED", "SECONDARY")}, "derived"),
        ({"number_of_slices": 0}, "no slices"),
    ],
)
def test_refused_series_carry_a_reason(change: dict[str, object], reason: str) -> None:
    got = gate_reason(dataclasses.replace(T1, **change))  # type: ignore[arg-type]
    assert got is not None and reason.lower() in got.lower()


def test_in_brain_mask_drops_edge_slices() -> None:
    images = np.zeros((4, 1, 10, 10), np.float32)
    images[1, 0, 2:8, 2:8] = 1.0  # 36 %
    images[2, 0, 1:9, 1:9] = 1.0  # 64 %
    images[3, 0, 4:7, 4:7] = 1.0  # 9 %: skull edge
    fractions = brain_fraction(images)
    mask = in_brain_mask(fractions, {"min_brain_fraction": 0.15, "relative_brain_fraction": 0.5})
    assert mask.tolist() == [False, True, True, False]


def test_neighbour_support_caps_isolated_peaks() -> None:
    tumour = np.array([0.1, 0.9, 0.1, 0.8, 0.85, 0.7])
    scores = neighbour_supported(tumour, np.ones(6, bool), window=1)
    assert scores[1] == pytest.approx(0.1)  # isolated
    assert scores[4] == pytest.approx(0.8)  # supported by neighbours
    single = neighbour_supported(np.array([0.9]), np.ones(1, bool), window=1)
    assert single[0] == pytest.approx(0.9)


def test_aggregate_series_label_and_urgency() -> None:
    probs = np.array(
        [[0.05, 0.05, 0.85, 0.05], [0.7, 0.1, 0.1, 0.1], [0.8, 0.05, 0.1, 0.05], [0.1, 0.1, 0.7, 0.1]], dtype=np.float32
    )
    score = aggregate_series(probs, np.array([True, True, True, False]), CLASSES, {"top_k": 2, "neighbour_window": 1})
    assert CLASSES[score.label_index] == "glioma"
    assert score.key_slice_indices[:2] == (1, 2)
    assert score.urgency == pytest.approx(0.9)  # slices 1, 2: min(0.9, 0.9), min(0.9, 0.9)
    assert score.class_probabilities.sum() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no in-brain"):
        aggregate_series(probs, np.zeros(4, bool), CLASSES, {})
