"""Outputs from messy headers: every real brain series of ../shared/data/dicom, and fuzzed header values.

Real anonymised headers break the rules (the UIH T1 series has StudyDate, PatientBirthDate and PatientAge
``***``). Every series must still get its SC, KOS and SR, valid for dciodvfy; what was repaired is logged
once, by keyword, never with the value.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.valuerep import validate_value
from structlog.testing import capture_logs

from tests.conftest import SHARED_DATA, shared_data
from tests.support.dicom_tools import dciodvfy_errors, tool
from triaged.config import OutputSettings
from triaged.dicom.synthetic import write_mr_series
from triaged.outputs.build import build_outputs, encode
from triaged.outputs.headers import COPIED_KEYWORDS, PERSON_NAME_WARNING, clean_copied_attributes
from triaged.outputs.summary import KeySlice, TriageSummary, decision_line, distinct_digits

pytestmark = pytest.mark.filterwarnings(f"ignore:{PERSON_NAME_WARNING}:UserWarning")


def _brain_series() -> dict[str, list[Path]]:
    """Every series whose content label in index.csv says BRAIN (anatomical, DWI, EPI), by series UID.

    Not Siemens mosaics: a whole volume tiled in one image is never assessed, so it never has key slices.
    """
    root = shared_data() / "dicom"
    series: dict[str, list[Path]] = defaultdict(list)
    with (root / "index.csv").open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if row["content"].startswith("BRAIN") and "MOSAIC" not in row["content"] and row["decode_ok"] == "yes":
                series[f"{Path(row['path']).parent}|{row['SeriesInstanceUID']}"].append(root / row["path"])
    return dict(sorted(series.items()))


def _summary(ds: Dataset, urgency: float = 0.9938, threshold: float = 0.9942) -> TriageSummary:
    return TriageSummary(
        series_instance_uid=str(ds.SeriesInstanceUID),
        generation=1,
        status="assessed",
        model_name="densenet121-brainmri",
        model_version="1.2.0",
        model_sha256="0f" * 32,
        label="meningioma",
        probabilities={"glioma": 0.05, "meningioma": 0.85, "notumor": 0.05, "pituitary": 0.05},
        urgency=urgency,
        threshold=threshold,
        urgent=urgency >= threshold,
    )


def _cam(ds: Dataset) -> np.ndarray:
    cam = np.zeros((int(ds.Rows), int(ds.Columns)), dtype=np.float32)
    cam[int(ds.Rows) // 3 : int(ds.Rows) // 2, int(ds.Columns) // 3 : int(ds.Columns) // 2] = 1.0
    return cam


def _assert_copied_attributes_valid(ds: Dataset) -> None:
    for keyword in COPIED_KEYWORDS:
        tag = tag_for_keyword(keyword)
        if keyword not in ds or ds[keyword].value in (None, "") or dictionary_VR(tag) in ("US", "SS", "FD", "FL"):
            continue
        assert dictionary_VR(tag) == ds[keyword].VR, keyword
        for value in ds[keyword].value if ds[keyword].VM > 1 else [ds[keyword].value]:
            validate_value(ds[keyword].VR, str(value), config.RAISE)


def _roundtrip(ds: Dataset) -> Dataset:
    return pydicom.dcmread(BytesIO(encode(ds)))


SERIES = _brain_series() if (SHARED_DATA / "README.md").is_file() else {}  # missing: one test that skips


@pytest.mark.parametrize("series", list(SERIES) or ["missing"], ids=lambda key: key.split("|")[0])
def test_every_real_brain_series_gets_all_its_outputs(series: str, tmp_path: Path) -> None:
    tool("dciodvfy", "dicom3tools")  # before the work: a missing tool skips (fails in CI) at once
    paths = _brain_series()[series]
    headers = [pydicom.dcmread(path, stop_before_pixels=True) for path in paths]
    middle = pydicom.dcmread(paths[len(paths) // 2])
    frames = int(getattr(middle, "NumberOfFrames", 1) or 1)
    keys = [KeySlice(middle, frames // 2 if frames > 1 else None, _cam(middle), 0.9)]
    with capture_logs() as logs:
        built = build_outputs(_summary(middle), keys, headers, OutputSettings())
    assert [b.kind for b in built] == ["sc", "kos", "sr"], logs
    repaired = [e for e in logs if e["event"] == "output_headers_repaired"]
    assert len(repaired) <= 1  # once per series, however many instances had the bad value
    assert not [e for e in logs if e["event"] == "output_build_failed"]
    for event in logs:  # keywords only: no value from the headers reaches the log
        text = repr(event)
        for value in (str(middle.get("PatientName", "")), str(middle.get("PatientID", ""))):
            assert len(value) < 4 or value not in text
    for output in built:
        ds = _roundtrip(output.dataset)
        assert ds.StudyInstanceUID == middle.StudyInstanceUID
        _assert_copied_attributes_valid(ds)
        path = tmp_path / f"{output.kind}-{output.index}.dcm"
        path.write_bytes(encode(output.dataset))
        assert dciodvfy_errors(path) == [], output.kind


def test_the_uih_series_has_its_bad_dates_left_out_and_logged_by_keyword() -> None:
    folder = shared_data() / "dicom" / "neurolabusc_dcm_qa_uih" / "In" / "DTI_132225" / "t1_gre_fsp_3d_sag__132750"
    paths = sorted(folder.iterdir())
    source = pydicom.dcmread(paths[10])
    assert source.StudyDate == "***"
    with capture_logs() as logs:
        built = build_outputs(_summary(source), [KeySlice(source, None, _cam(source), 0.9)], [source], OutputSettings())
    sc = _roundtrip(built[0].dataset)
    assert sc.StudyDate == "" and sc.PatientID == source.PatientID and sc.StudyTime == source.StudyTime
    (event,) = [e for e in logs if e["event"] == "output_headers_repaired"]
    assert {"StudyDate", "PatientBirthDate", "PatientAge"} <= set(event["left_out"])
    assert "***" not in repr(event)
    assert source.StudyDate == "***"  # the source dataset itself is never changed


_ASCII = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=90)
_FUZZED = ["StudyDate", "StudyTime", "PatientBirthDate", "PatientName", "PatientID", "PatientSex", "PatientAge",
           "AccessionNumber", "StudyID", "StudyDescription", "ReferringPhysicianName", "PatientWeight",
           "BodyPartExamined"]  # fmt: skip
_WRONG_VR = st.sampled_from(["LO", "SH", "DA", "PN", "CS", "UN", "DS", "LT"])


@pytest.fixture(scope="module")
def synthetic_source(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    yy, xx = np.mgrid[0:64, 0:64]
    head = (((xx - 32) ** 2 + (yy - 32) ** 2) < 700) * 500.0
    paths = write_mr_series([head, head, head], tmp_path_factory.mktemp("fuzz"), seed="fuzz")
    return pydicom.dcmread(paths[1])


@pytest.mark.filterwarnings("ignore::UserWarning:pydicom.*")  # pydicom warns about the bad values it reads
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.dictionaries(st.sampled_from(_FUZZED), st.tuples(_ASCII, st.none() | _WRONG_VR), max_size=6))
def test_fuzzed_header_values_never_cost_the_outputs(
    synthetic_source: Dataset, values: dict[str, tuple[str, str | None]]
) -> None:
    source = pydicom.dcmread(BytesIO(encode(synthetic_source)))
    for keyword, (value, wrong_vr) in values.items():  # as a file read from disk would hold them: raw bytes
        tag = Tag(tag_for_keyword(keyword))
        raw = value.encode("ascii")
        raw += b" " * (len(raw) % 2)
        source[tag] = RawDataElement(tag, wrong_vr or dictionary_VR(tag), len(raw), raw, 0, False, True)
    cleaned, _ = clean_copied_attributes(source)
    for keyword in COPIED_KEYWORDS:
        if keyword in cleaned and cleaned[keyword].value not in (None, ""):
            element = cleaned[keyword]
            assert dictionary_VR(element.tag) == element.VR
    # The SC copies the same attributes through highdicom's SC constructor: checked on a few (rendering is slow).
    options = OutputSettings(secondary_captures=len(values) % 3 == 0)
    built = build_outputs(_summary(source), [KeySlice(source, None, _cam(source), 0.9)], [source], options)
    assert [b.kind for b in built] == (["sc"] if options.secondary_captures else []) + ["kos", "sr"]
    for output in built:
        _assert_copied_attributes_valid(_roundtrip(output.dataset))


def test_urgency_and_threshold_never_print_equal_when_they_differ() -> None:
    assert distinct_digits(0.9938, 0.9942) == ("0.9938", "0.9942")
    assert distinct_digits(0.83, 0.5) == ("0.83", "0.50")
    assert distinct_digits(0.99418, 0.9942) == ("0.99418", "0.99420")  # rounding would have made them equal
    assert distinct_digits(0.994199, 0.9942)[0] != distinct_digits(0.994199, 0.9942)[1]
    ds = Dataset()
    ds.SeriesInstanceUID = "1.2.3"
    below = decision_line(_summary(ds, urgency=0.9938, threshold=0.9942))
    assert below == "Urgency 0.9938 < threshold 0.9942 → not urgent"
    assert "0.99 < threshold 0.99" not in below


@given(urgency=st.floats(0, 1), threshold=st.floats(0, 1))
def test_printed_numbers_compare_like_the_numbers(urgency: float, threshold: float) -> None:
    a, b = distinct_digits(urgency, threshold)
    if abs(urgency - threshold) >= 1e-6:
        assert (float(a) < float(b)) == (urgency < threshold) and a != b


def test_the_sr_states_the_decision_with_the_same_digits(synthetic_source: Dataset) -> None:
    summary = _summary(synthetic_source)
    built = build_outputs(summary, [KeySlice(synthetic_source, None, None, 0.9)], [synthetic_source], OutputSettings())
    sr = _roundtrip(built[-1].dataset)
    texts = [str(item.TextValue) for item in sr.ContentSequence if item.ValueType == "TEXT"]
    assert "Urgency 0.9938 < threshold 0.9942 -> not urgent" in texts


def test_one_object_that_fails_to_build_does_not_cost_the_others(synthetic_source: Dataset) -> None:
    broken = pydicom.dcmread(BytesIO(encode(synthetic_source)))
    del broken.PixelData  # this key slice cannot become a Secondary Capture; KOS and SR need no pixels
    good = KeySlice(synthetic_source, None, None, 0.9)
    with capture_logs() as logs:
        built = build_outputs(
            _summary(synthetic_source), [KeySlice(broken, None, None, 0.95), good], [synthetic_source], OutputSettings()
        )
    assert [(b.kind, b.index) for b in built] == [("sc", 1), ("kos", 0), ("sr", 0)]
    failed = [e for e in logs if e["event"] == "output_build_failed"]
    assert [(e["kind"], e["index"]) for e in failed] == [("sc", 0)]
