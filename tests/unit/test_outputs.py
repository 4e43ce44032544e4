"""Secondary Capture, KOS and SR built with highdicom from a synthetic MR series; round-tripped and dumped."""

from __future__ import annotations

import subprocess
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    KeyObjectSelectionDocumentStorage,
    SecondaryCaptureImageStorage,
)

from tests.support.dicom_tools import dciodvfy_errors, tool
from triaged.config import OutputSettings
from triaged.dicom.synthetic import write_mr_series
from triaged.outputs.build import build_outputs, encode
from triaged.outputs.summary import KeySlice, TriageSummary, instance_uid, series_uid

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


def _phantom(index: int, size: int = 96) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    head = ((xx - size / 2) ** 2 / (0.4 * size) ** 2 + (yy - size / 2) ** 2 / (0.45 * size) ** 2) < 1
    return np.asarray(head * (600.0 + 10 * index), dtype=np.float64)


@pytest.fixture
def source(tmp_path: Path) -> list[Dataset]:
    paths = write_mr_series([_phantom(i) for i in range(5)], tmp_path / "src", seed="outputs", patient_id="P123")
    return [pydicom.dcmread(path) for path in paths]


def _summary(ds: Dataset, **changes: object) -> TriageSummary:
    values: dict[str, object] = {
        "series_instance_uid": str(ds.SeriesInstanceUID),
        "generation": 1,
        "status": "assessed",
        "model_name": "densenet121-brainmri",
        "model_version": "1.0.0",
        "model_sha256": "0f" * 32,
        "label": "meningioma",
        "probabilities": {"glioma": 0.05, "meningioma": 0.85, "notumor": 0.05, "pituitary": 0.05},
        "urgency": 0.83,
        "threshold": 0.5,
        "urgent": True,
    }
    values.update(changes)
    return TriageSummary(**values)  # type: ignore[arg-type]


def _keys(source: list[Dataset]) -> list[KeySlice]:
    cam = np.zeros((96, 96), dtype=np.float32)
    cam[30:50, 50:70] = 1.0
    return [KeySlice(source[2], None, cam, 0.9), KeySlice(source[3], None, cam, 0.8)]


def _roundtrip(ds: Dataset) -> Dataset:
    return pydicom.dcmread(BytesIO(encode(ds)))


def test_all_outputs_round_trip_with_expected_tags(source: list[Dataset]) -> None:
    summary = _summary(source[0])
    built = build_outputs(summary, _keys(source), source, OutputSettings(series_number=9900))
    assert [(o.kind, o.index) for o in built] == [("sc", 0), ("sc", 1), ("kos", 0), ("sr", 0)]
    objects = [_roundtrip(o.dataset) for o in built]
    sc, kos, sr = objects[0], objects[2], objects[3]
    for ds in objects:
        assert ds.StudyInstanceUID == source[0].StudyInstanceUID
        assert ds.PatientID == "P123"
        assert ds.SeriesInstanceUID != source[0].SeriesInstanceUID
        assert ds.SeriesDescription.startswith("AI TRIAGE URGENT:")
        assert ds.Manufacturer == "triaged"
    assert sc.SOPClassUID == SecondaryCaptureImageStorage
    assert sc.Modality == "OT" and sc.BurnedInAnnotation == "YES" and sc.SeriesNumber == 9900
    assert sc.PhotometricInterpretation == "RGB" and sc.BitsAllocated == 8 and sc.SamplesPerPixel == 3
    assert sc.PlanarConfiguration == 0 and sc.ConversionType == "DI"
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source[2].SOPInstanceUID
    assert sc.ReferencedImageSequence[0].ReferencedSOPClassUID == source[2].SOPClassUID
    assert list(sc.PatientOrientation) == ["L", "P"]
    assert sc.ManufacturerModelName and sc.SoftwareVersions
    equipment = [(item.Manufacturer, item.get("ManufacturerModelName")) for item in sc.ContributingEquipmentSequence]
    assert ("triaged", "densenet121-brainmri") in equipment
    assert sc.pixel_array.shape[1] >= 512 and sc.pixel_array.shape[2] == 3
    assert objects[1].SeriesInstanceUID == sc.SeriesInstanceUID and objects[1].InstanceNumber == 2
    assert kos.SOPClassUID == KeyObjectSelectionDocumentStorage and kos.Modality == "KO"
    assert kos.SeriesNumber == 9901
    kos_refs = {
        item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for item in kos.ContentSequence
        if "ReferencedSOPSequence" in item
    }
    assert kos_refs == {source[2].SOPInstanceUID, source[3].SOPInstanceUID}
    assert sr.SOPClassUID == COMPREHENSIVE_3D_SR and sr.Modality == "SR" and sr.SeriesNumber == 9902
    numbers = {
        item.ConceptNameCodeSequence[0].CodeMeaning: float(item.MeasuredValueSequence[0].NumericValue)
        for item in sr.ContentSequence
        if item.ValueType == "NUM"
    }
    assert numbers["Probability of meningioma"] == pytest.approx(0.85)
    assert numbers["Urgency score"] == pytest.approx(0.83)
    assert numbers["Urgency threshold"] == pytest.approx(0.5)
    texts = {
        item.ConceptNameCodeSequence[0].CodeMeaning: item.TextValue
        for item in sr.ContentSequence
        if item.ValueType == "TEXT"
    }
    assert texts["Algorithm Name"] == "densenet121-brainmri" and texts["Algorithm Version"] == "1.0.0"
    assert sr.CompletionFlag == "COMPLETE"


def test_uids_are_derived_from_the_result(source: list[Dataset]) -> None:
    summary = _summary(source[0])
    first = build_outputs(summary, _keys(source), source, OutputSettings())
    again = build_outputs(summary, _keys(source), source, OutputSettings())
    assert [o.sop_instance_uid for o in first] == [o.sop_instance_uid for o in again]
    assert first[0].sop_instance_uid == instance_uid(summary, "sc", 0)
    assert first[0].series_instance_uid == series_uid(summary, "sc")
    other = build_outputs(_summary(source[0], generation=2), _keys(source), source, OutputSettings())
    assert not {o.sop_instance_uid for o in first} & {o.sop_instance_uid for o in other}
    for output in first:
        assert output.sop_instance_uid.startswith("2.25.") and len(output.sop_instance_uid) <= 64


def test_non_urgent_series_is_labelled_routine(source: list[Dataset]) -> None:
    summary = _summary(source[0], label="notumor", urgent=False, urgency=0.1)
    built = build_outputs(summary, _keys(source)[:1], source, OutputSettings())
    assert built[0].dataset.SeriesDescription == "AI TRIAGE: no tumour (below threshold)"
    assert build_outputs(summary, _keys(source), source, OutputSettings(mode="urgent")) == []
    assert build_outputs(_summary(source[0]), _keys(source), source, OutputSettings(mode="none")) == []


def test_switches_turn_objects_off(source: list[Dataset]) -> None:
    options = OutputSettings(key_object_selection=False, structured_report=False)
    assert {o.kind for o in build_outputs(_summary(source[0]), _keys(source), source, options)} == {"sc"}
    options = OutputSettings(secondary_captures=False)
    assert [o.kind for o in build_outputs(_summary(source[0]), _keys(source), source, options)] == ["kos", "sr"]


def test_not_assessable_gets_nothing_by_default_and_a_notice_when_asked(source: list[Dataset]) -> None:
    summary = _summary(source[0], status="not_assessable", reason="diffusion series", label=None, urgent=False)
    assert build_outputs(summary, [], source, OutputSettings(), fallback_slice=source[2]) == []
    sc_only = build_outputs(summary, [], source, OutputSettings(not_assessable="sc"), fallback_slice=source[2])
    assert [o.kind for o in sc_only] == ["sc"]
    notice = _roundtrip(sc_only[0].dataset)
    assert notice.SeriesDescription == "AI TRIAGE: not assessable"
    sr_only = build_outputs(summary, [], source, OutputSettings(not_assessable="sr"))
    sr = _roundtrip(sr_only[0].dataset)
    comments = [item.TextValue for item in sr.ContentSequence if item.ValueType == "TEXT"]
    assert "diffusion series" in comments


@pytest.mark.dcmtk
def test_dcmdump_reads_every_object(source: list[Dataset], tmp_path: Path) -> None:
    dcmdump = tool("dcmdump", "dcmtk")
    built = build_outputs(_summary(source[0]), _keys(source), source, OutputSettings())
    for output in built:
        path = tmp_path / f"{output.kind}{output.index}.dcm"
        path.write_bytes(encode(output.dataset))
        run = subprocess.run([dcmdump, "-E", str(path)], capture_output=True, text=True, check=False)
        assert run.returncode == 0, run.stderr
        assert "BurnedInAnnotation" in run.stdout or output.kind != "sc"
        assert "W: " not in run.stderr and "E: " not in run.stderr


def test_dciodvfy_finds_no_error_in_any_object(source: list[Dataset], tmp_path: Path) -> None:
    """Every object is valid for its IOD; dciodvfy missing is a skip (a failure in CI), never a pass."""
    built = build_outputs(_summary(source[0]), _keys(source), source, OutputSettings())
    assert [o.kind for o in built] == ["sc", "sc", "kos", "sr"]
    for output in built:
        path = tmp_path / f"{output.kind}{output.index}.dcm"
        path.write_bytes(encode(output.dataset))
        assert dciodvfy_errors(path) == [], path.name
    # The check can fail: the same SC without a Type 1 attribute is reported.
    broken = built[0].dataset
    del broken.ConversionType
    (tmp_path / "broken.dcm").write_bytes(encode(broken))
    assert any("ConversionType" in line for line in dciodvfy_errors(tmp_path / "broken.dcm"))


@pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent the intended person name:UserWarning")
def test_multi_frame_source_is_referenced_by_frame() -> None:
    from tests.conftest import shared_data

    folder = shared_data() / "dicom" / "neurolabusc_dcm_qa_xa30" / "In" / "6_anat-T1w_acq-tfl"
    source = pydicom.dcmread(sorted(folder.glob("*.dcm"))[0])
    assert int(source.NumberOfFrames) > 40
    cam = np.zeros((source.Rows, source.Columns), dtype=np.float32)
    cam[40:80, 40:80] = 1.0
    summary = _summary(source, label="notumor", urgent=False, urgency=0.1)
    built = build_outputs(summary, [KeySlice(source, 40, cam, 0.1)], [source], OutputSettings())
    sc, kos, sr = (_roundtrip(o.dataset) for o in built)
    reference = sc.SourceImageSequence[0]
    assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID and reference.ReferencedFrameNumber == 40
    assert list(sc.PatientOrientation) == ["P", "F"]  # sagittal: from the per-frame orientation
    images = [item for item in sr.ContentSequence if item.ValueType == "IMAGE"]
    assert images[0].ReferencedSOPSequence[0].ReferencedFrameNumber == 40
    assert kos.SeriesDescription == "AI TRIAGE: no tumour (below threshold)"
