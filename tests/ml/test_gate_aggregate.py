"""Assessability gate and series aggregation (pure functions, no model)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from triaged.ml.aggregate import (
    aggregate_series,
    brain_measures,
    coarse_matrix_reason,
    in_brain_mask,
    neighbour_supported,
    relative_signal,
)
from triaged.ml.gate import gate_reason
from triaged.ml.registry import default_aggregation
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


def _disc(size: int, radius: float, value: float = 0.6) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return (((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < radius**2).astype(np.float32) * value


def test_in_brain_mask_drops_edge_slices() -> None:
    size = 64
    images = np.stack([_disc(size, r)[None] for r in (3, 18, 24, 24, 22, 8)])
    raw = [img[0] * 1000 for img in images]
    mask = in_brain_mask(brain_measures(images, relative_signal(raw)), default_aggregation())
    assert mask.tolist() == [False, True, True, True, True, False]  # the small vertex and skull-base discs drop


def test_in_brain_mask_holds_for_a_small_skull_stripped_brain() -> None:
    """A brain that fills a fifth of the square (large field of view, skull stripped) is still brain."""
    size = 64
    images = np.stack([_disc(size, 14)[None] for _ in range(5)])  # ~15 % of the square each
    mask = in_brain_mask(brain_measures(images, relative_signal([i[0] for i in images])), default_aggregation())
    assert mask.all()


def test_in_brain_mask_refuses_noise_and_filled_fields() -> None:
    """Slices above the head (dark noise, rescaled bright by preprocessing) and fields filled to the corners."""
    size, rng = 64, np.random.default_rng(0)
    brain = [_disc(size, 22) for _ in range(6)]
    noise = rng.uniform(0.0, 1.0, (size, size)).astype(np.float32)
    images = np.stack([*(b[None] for b in brain), noise[None], np.full((1, size, size), 0.8, np.float32)])
    raw = [b * 1000 for b in brain] + [noise * 30, np.full((size, size), 900.0, np.float32)]
    mask = in_brain_mask(brain_measures(images, relative_signal(raw)), default_aggregation())
    assert mask.tolist() == [True] * 6 + [False, False]


def test_in_brain_mask_ignores_one_odd_slice_when_judging_head_size() -> None:
    """One full-field artefact slice must not make every real slice look small (the TCGA_DU_7018 failure)."""
    size = 64
    images = np.stack([np.full((1, size, size), 0.9, np.float32), *(_disc(size, 20)[None] for _ in range(8))])
    raw = [np.full((size, size), 800.0, np.float32)] + [_disc(size, 20) * 1000 for _ in range(8)]
    mask = in_brain_mask(brain_measures(images, relative_signal(raw)), default_aggregation())
    assert mask.tolist() == [False] + [True] * 8


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


@pytest.mark.parametrize(
    "description",
    [
        "Ax T2 FLAIR ASSET",
        "AX T1 FSE ASSET",
        "Sag T1 FLAIR ARC",
        "AX T2 PROPELLER",
        "t2_tse_tra_BLADE",
        "t1_fl2d_tra BLADE",
        "T1W_SE SENSE",
        "T1W_3D_TFE CS",
        "AX T1 BRAVO ARC +C",
        "sT1W_3D_TFE SENSE",
        "Ax T2 FRFSE",
        "T2W_TSE",
    ],
)
def test_vendor_option_names_do_not_refuse_anatomical_series(description: str) -> None:
    meta = dataclasses.replace(T1, series_description=description, protocol_name=description)
    assert gate_reason(meta) is None


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"series_description": "ASSET calibration"}, "calibration"),
        ({"series_description": "Ax PD FSE"}, "proton density"),
        ({"series_description": "AX T2* GRE"}, "T2*"),
        ({"series_description": "SWI_Images"}, "susceptibility"),
        ({"series_description": "Ax DWI ASSET"}, "diffusion"),
        ({"series_description": "SURVEY"}, "localizer"),
        (
            {
                "scanning_sequence": ("SE",),
                "series_description": "AX FSE",
                "repetition_time": 3000.0,
                "echo_time": 20.0,
            },
            "proton-density",
        ),
        (
            {"scanning_sequence": ("GR",), "series_description": "AX GRE", "repetition_time": 600.0, "echo_time": 20.0},
            "gradient echo",
        ),
    ],
)
def test_contrasts_the_model_never_learned_are_refused(change: dict[str, object], reason: str) -> None:
    got = gate_reason(dataclasses.replace(T1, **change))  # type: ignore[arg-type]
    assert got is not None and reason.lower() in got.lower()


@pytest.mark.parametrize(
    "timing",
    [
        {"scanning_sequence": ("SE",), "repetition_time": 550.0, "echo_time": 12.0},  # T1 spin echo
        {"scanning_sequence": ("SE",), "repetition_time": 4000.0, "echo_time": 100.0},  # T2 turbo spin echo
        {"scanning_sequence": ("SE", "IR"), "repetition_time": 9000.0, "echo_time": 120.0, "inversion_time": 2500.0},
        {"scanning_sequence": ("GR", "IR"), "repetition_time": 2300.0, "echo_time": 2.3},  # MPRAGE
        {"scanning_sequence": ("GR",), "repetition_time": 8.0, "echo_time": 3.1},  # SPGR / BRAVO
    ],
)
def test_anatomical_timings_pass(timing: dict[str, object]) -> None:
    assert gate_reason(dataclasses.replace(T1, series_description="AX", **timing)) is None  # type: ignore[arg-type]


def test_images_smaller_than_the_model_input_are_refused_as_too_coarse() -> None:
    """The longer side decides (preprocessing resizes it to the input size): 64 x 64 and 82 x 48 are refused,
    128 x 96 and 512 x 460 pass, and a model that does not declare ``min_matrix`` scores any size."""
    aggregation = default_aggregation(128)
    assert aggregation["min_matrix"] == 128 and "min_matrix" not in default_aggregation()
    for shape in ((64, 64), (82, 48), (127, 127)):
        reason = coarse_matrix_reason([np.zeros(shape, np.float32)] * 3, aggregation)
        assert reason is not None and f"{shape[0]} x {shape[1]}" in reason and "128-pixel input" in reason, shape
    for shape in ((128, 96), (96, 128), (512, 460)):
        assert coarse_matrix_reason([np.zeros(shape, np.float32)] * 3, aggregation) is None, shape
    assert coarse_matrix_reason([np.zeros((64, 64), np.float32)], default_aggregation()) is None
    assert coarse_matrix_reason([], aggregation) is None
