"""tcga_lgg in the manifest: the slice-label rule, the patient/site split, and the volume series built from it."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest

from triaged.dicom.pixels import decode_series, read_series_header
from triaged.dicom.synthetic import write_mr_series
from triaged.errors import PixelDecodeError
from triaged.ml.gate import gate_reason
from triaged.training.data import Sample, training_samples
from triaged.training.lgg import (
    MIN_TUMOUR_PIXELS,
    UNSEEN_SITE,
    lgg_patient,
    lgg_samples,
    lgg_site,
    patient_splits,
    slice_label,
)
from triaged.training.series_eval import (
    SeriesOutcome,
    choose_threshold,
    load_volume,
    read_series,
    series_meta_of,
    threshold_interval,
    volume_series,
    wilson_interval,
    write_volume_series,
)


@pytest.mark.parametrize(
    ("pixels", "neighbour", "expected"),
    [
        (MIN_TUMOUR_PIXELS, False, ("glioma", "")),
        (5000, True, ("glioma", "")),
        (MIN_TUMOUR_PIXELS - 1, False, ("glioma", "tiny_mask")),
        (1, True, ("glioma", "tiny_mask")),
        (0, True, ("notumor", "next_to_lesion")),
        (0, False, ("notumor", "")),
    ],
)
def test_slice_label_rule(pixels: int, neighbour: bool, expected: tuple[str, str]) -> None:
    assert slice_label(pixels, neighbour) == expected


def test_patient_splits_keep_the_unseen_site_out_of_training() -> None:
    sites = {"DU": [f"TCGA_DU_{i:04d}" for i in range(45)], UNSEEN_SITE: [f"TCGA_HT_{i:04d}" for i in range(34)]}
    sites["EZ"] = ["TCGA_EZ_0001"]
    splits = patient_splits(sites)
    assert {splits[p] for p in sites[UNSEEN_SITE]} == {"val", "test"}
    assert sum(splits[p] == "val" for p in sites[UNSEEN_SITE]) == 17
    assert splits["TCGA_EZ_0001"] == "test"
    du = [splits[p] for p in sites["DU"]]
    assert du.count("test") == 7 and du.count("val") == 7 and du.count("train") == 31
    assert patient_splits(sites) == splits  # deterministic


@pytest.fixture(scope="module")
def shared_data() -> Path:
    from tests.conftest import shared_data as find_shared_data

    return find_shared_data()


@pytest.fixture(scope="module")
def samples(shared_data: Path) -> list[Sample]:
    return lgg_samples(shared_data)


def test_no_patient_on_two_sides_and_no_unseen_site_in_training(samples: list[Sample]) -> None:
    sides: dict[str, set[str]] = defaultdict(set)
    for s in samples:
        sides[lgg_patient(s.path)].add(s.split)
    assert all(len(v) == 1 for v in sides.values())
    assert not [s for s in training_samples(samples, "train") if lgg_site(s.path) == UNSEEN_SITE]
    assert len(sides) == 80


def test_flair_copies_never_count_as_t1(samples: list[Sample]) -> None:
    copies = [s for s in samples if s.exclude_reason == "duplicated_channel"]
    assert copies and all("/flair/" not in s.path for s in copies)
    assert not [s for s in training_samples(samples, "train") if s.exclude_reason]


def test_volume_series_decode_to_the_same_pixels_and_pass_the_gate(
    samples: list[Sample],
    shared_data: Path,
    tmp_path: Path,
) -> None:
    series = [v for v in volume_series(samples, "test") if v.patient == "TCGA_DU_7018"]
    assert {v.contrast for v in series} == {"flair", "t1_pre", "t1_post"}
    for vs in series:
        paths = write_volume_series(shared_data, vs, tmp_path / vs.contrast)
        decoded = decode_series(paths)
        source = load_volume(shared_data, vs)
        assert len(decoded.slices) == len(source) == 36
        for got, want in zip(decoded.slices, source, strict=True):
            assert np.abs(got.pixels - want).max() <= 0.05  # 12-bit stored, LUT back to the 8-bit grey levels
        header, n = read_series_header(paths)
        meta = series_meta_of(header, n)
        assert gate_reason(meta) is None, vs.contrast
        if vs.contrast == "flair":
            assert "IR" in meta.scanning_sequence and meta.inversion_time == 2500.0


@pytest.mark.parametrize("description", ["AX T1 SE", "DWI b1000"])
def test_read_series_of_an_undecodable_series(tmp_path: Path, description: str) -> None:
    """No slices and the header's metadata; ``strict`` (the daemon's rule) raises unless the gate refuses anyway."""
    paths = write_mr_series([np.full((16, 16), 100.0)] * 3, tmp_path, series_description=description)
    ds = pydicom.dcmread(paths[1])
    ds.PixelData = ds.PixelData[:10]  # truncated: the decoder refuses it, the header still reads
    ds.save_as(paths[1])
    slices, meta = read_series(tmp_path)
    assert slices == [] and meta.number_of_slices == 3
    gated = gate_reason(meta) is not None
    assert gated == (description == "DWI b1000")
    if gated:
        assert read_series(paths, strict=True) == ([], meta)
    else:
        with pytest.raises(PixelDecodeError):
            read_series(paths, strict=True)
    assert len(read_series(paths[:1], strict=True)[0]) == 1


def _outcome(urgency: float | None) -> SeriesOutcome:
    return SeriesOutcome("p", UNSEEN_SITE, "flair", urgency is not None, None, urgency, None, (), None, None)


def test_choose_threshold_counts_refusals_as_misses() -> None:
    outcomes = [_outcome(u) for u in (0.2, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99)]
    assert choose_threshold(outcomes, 0.9) == pytest.approx(0.5)  # one of ten may be missed
    assert choose_threshold(outcomes, 1.0) == pytest.approx(0.2)
    refused = [_outcome(None), *outcomes[1:]]
    assert choose_threshold(refused, 0.9) == pytest.approx(0.5)  # the refusal is the one miss
    assert choose_threshold([_outcome(0.999)] * 4, 0.95) == pytest.approx(0.99)  # ceiling


def _rows(urgencies_by_patient: dict[str, list[float | None]]) -> list[dict[str, object]]:
    return [
        {"patient": patient, "assessable": u is not None, "urgency": u}
        for patient, urgencies in urgencies_by_patient.items()
        for u in urgencies
    ]


def test_threshold_interval_is_a_point_when_every_patient_looks_alike() -> None:
    rows = _rows({f"p{i}": [0.3, 0.8, 0.9] for i in range(6)})
    interval = threshold_interval(rows, 0.9)
    assert interval["lo"] == interval["hi"] == pytest.approx(0.3)  # the rule on every resample picks the same
    assert interval["patients"] == 6


def test_threshold_interval_spans_what_other_patients_would_have_chosen() -> None:
    # one patient with a low-scoring series decides the threshold: resamples without it choose far higher
    rows = _rows({"low": [0.1, 0.9, 0.9], **{f"p{i}": [0.8, 0.9, 0.95] for i in range(9)}})
    chosen = choose_threshold([_outcome(float(r["urgency"])) for r in rows], 0.95)  # type: ignore[arg-type]
    interval = threshold_interval(rows, 0.95, rounds=500)
    assert interval["lo"] <= chosen <= interval["hi"]
    assert interval["lo"] == pytest.approx(0.1) and interval["hi"] == pytest.approx(0.8)
    refused = _rows({"low": [None, 0.9, 0.9], **{f"p{i}": [0.8, 0.9, 0.95] for i in range(9)}})
    assert threshold_interval(refused, 0.95, rounds=500)["lo"] == 0.0  # a refusal is a miss, as in the rule


def test_the_card_says_how_far_the_threshold_moves_and_what_that_does_to_test_sensitivity() -> None:
    from triaged.training.model_card_volumes import threshold_stability_lines

    val = [{**r, "site": UNSEEN_SITE} for r in _rows({"low": [0.1, 0.9], **{f"p{i}": [0.8, 0.9] for i in range(9)}})]
    val += [{**r, "site": "DU"} for r in _rows({"seen": [0.0, 0.0]})]  # not the site the rule uses: ignored
    test = _rows({"t1": [0.5, 0.85], "t2": [0.95, None]})
    text = " ".join(threshold_stability_lines({"val": {"series": val}, "test": {"series": test}}))
    assert "10 validation patients" in text
    assert "from 0.100 to 0.800 (90 % of rounds)" in text
    assert "3/4 and 2/4 test tumour series would be urgent" in text
    assert threshold_stability_lines({"val": {"series": []}, "test": {"series": test}}) == []


def test_wilson_interval() -> None:
    lo, hi = wilson_interval(20, 20)
    assert hi == pytest.approx(1.0) and 0.8 < lo < 0.85
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and 0.25 < hi < 0.35
