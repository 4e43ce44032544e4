"""DICOM objects a triage result becomes: Secondary Captures (here), KOS and SR (reports.py), all via highdicom.

This module knows nothing of the database or the model: it takes plain summaries (summary.py) and source
datasets and returns datasets whose UIDs are derived from the result.
"""

from __future__ import annotations

from collections.abc import Sequence
from io import BytesIO

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian

from triaged import __version__
from triaged.config import OutputSettings
from triaged.dicom.pixels import DecodedSlice, decode_instance
from triaged.dicom.render import Banner, render_secondary_capture
from triaged.dicom.reports import build_key_object_selection, build_structured_report
from triaged.dicom.summary import (
    MANUFACTURER,
    MANUFACTURER_MODEL_NAME,
    SERIES_NUMBER_OFFSET,
    BuiltOutput,
    KeySlice,
    TriageSummary,
    contributing_equipment,
    instance_uid,
    pretty_label,
    series_description,
    series_uid,
)
from triaged.errors import OutputBuildError, PixelDecodeError


def source_slice(dataset: Dataset, frame_number: int | None) -> DecodedSlice:
    """One 2-D slice of ``dataset`` (modality LUT applied, MONOCHROME1 inverted) via the pipeline's decoder."""
    try:
        frames = decode_instance(dataset, "output source")
    except PixelDecodeError as exc:
        raise OutputBuildError(f"cannot decode source pixels: {exc}") from exc
    index = (frame_number or 1) - 1
    if not 0 <= index < len(frames):
        raise OutputBuildError(f"source has no frame {frame_number}")
    return frames[index]


def _orientation_letters(vector: Sequence[float]) -> str:
    letters = (("L", "R"), ("P", "A"), ("H", "F"))
    ranked = sorted(range(3), key=lambda axis: -abs(vector[axis]))
    return "".join(letters[axis][0 if vector[axis] > 0 else 1] for axis in ranked if abs(vector[axis]) > 0.25)[:3]


def patient_orientation(orientation: Sequence[float] | None) -> tuple[str, str] | None:
    """Row and column directions as PatientOrientation letters from ImageOrientationPatient (6 values)."""
    if orientation is None or len(orientation) != 6:
        return None
    values = [float(v) for v in orientation]
    row, column = _orientation_letters(values[:3]), _orientation_letters(values[3:])
    return (row, column) if row and column else None


def banner_for(summary: TriageSummary, key: KeySlice | None, index: int, total: int) -> Banner:
    model = f"Model: {summary.model_name} {summary.model_version}"
    if not summary.assessed:
        return Banner(
            "AI TRIAGE: NOT ASSESSED",
            (f"Reason: {summary.reason or 'not assessable'}", "No finding was judged on this series.", model),
        )
    ranked = sorted(summary.probabilities.items(), key=lambda item: -item[1])
    probs = ", ".join(f"{pretty_label(name)} {value:.2f}" for name, value in ranked)
    urgency = "-" if summary.urgency is None else f"{summary.urgency:.2f}"
    threshold = "-" if summary.threshold is None else f"{summary.threshold:.2f}"
    decision = "URGENT" if summary.urgent else "not urgent"
    relation = "≥" if summary.urgent else "<"
    slice_line = f"Key image {index + 1} of {total}"
    if key is not None and key.tumour_probability is not None:
        slice_line += f": slice tumour probability {key.tumour_probability:.2f}"
    headline = f"{'AI TRIAGE URGENT' if summary.urgent else 'AI TRIAGE'}: {pretty_label(summary.label)}"
    return Banner(
        headline,
        (
            f"Series class probabilities: {probs}",
            f"Urgency {urgency} {relation} threshold {threshold} → {decision}",
            slice_line,
            model,
        ),
        urgent=summary.urgent,
    )


def build_secondary_capture(
    summary: TriageSummary,
    key: KeySlice,
    *,
    index: int,
    total: int,
    series_number: int,
) -> Dataset:
    """One RGB Secondary Capture of a key slice, in the source study, referencing the source image."""
    source = key.dataset
    decoded = source_slice(source, key.frame_number)
    pixels = render_secondary_capture(decoded.pixels, key.cam, banner_for(summary, key, index, total))
    orientation = patient_orientation(decoded.orientation)
    try:
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=source,
            pixel_array=pixels,
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            patient_orientation=orientation or ("L", "P"),
            series_instance_uid=series_uid(summary, "sc"),
            series_number=series_number,
            sop_instance_uid=instance_uid(summary, "sc", index),
            instance_number=index + 1,
            manufacturer=MANUFACTURER,
            manufacturer_model_name=MANUFACTURER_MODEL_NAME,
            software_versions=__version__,
            series_description=series_description(summary),
            transfer_syntax_uid=ExplicitVRLittleEndian,
            contributing_equipment=contributing_equipment(summary),
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise OutputBuildError(f"cannot build Secondary Capture: {exc}") from exc
    if orientation is None:
        sc.PatientOrientation = []  # Type 2: unknown, rather than a made-up direction
    if source.get("BodyPartExamined"):
        sc.BodyPartExamined = source.BodyPartExamined
    sc.BurnedInAnnotation = "YES"
    if source.get("RecognizableVisualFeatures"):  # a sagittal head image may show a face: never assume "NO"
        sc.RecognizableVisualFeatures = source.RecognizableVisualFeatures
    sc.ImageComments = "AI TRIAGE - NOT FOR DIAGNOSTIC USE"
    sc.DerivationDescription = f"Grad-CAM overlay and triage banner by {summary.model_name} {summary.model_version}"[
        :1024
    ]
    sc.SourceImageSequence = [_image_reference(source, key.frame_number)]
    sc.ReferencedImageSequence = [_image_reference(source, key.frame_number)]
    return sc


def _image_reference(source: Dataset, frame_number: int | None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    if frame_number is not None and int(getattr(source, "NumberOfFrames", 1) or 1) > 1:
        item.ReferencedFrameNumber = frame_number
    return item


def build_outputs(
    summary: TriageSummary,
    key_slices: Sequence[KeySlice],
    evidence: Sequence[Dataset],
    options: OutputSettings,
    *,
    fallback_slice: Dataset | None = None,
) -> list[BuiltOutput]:
    """All objects for one result, in send order (SCs, then KOS, then SR), honouring ``options``.

    ``evidence`` are the source datasets the KOS/SR reference (headers suffice); ``fallback_slice`` is the
    slice shown on a "not assessed" SC when ``options.not_assessable == "sc"``.
    """
    if options.mode == "none" or (options.mode == "urgent" and not summary.urgent):
        return []
    built: list[BuiltOutput] = []
    base = options.series_number
    if not summary.assessed:
        if options.not_assessable == "sc" and fallback_slice is not None:
            sc = build_secondary_capture(summary, KeySlice(fallback_slice), index=0, total=1, series_number=base)
            built.append(BuiltOutput("sc", 0, sc))
        elif options.not_assessable == "sr":
            sr = build_structured_report(summary, [], evidence, series_number=base + SERIES_NUMBER_OFFSET["sr"])
            built.append(BuiltOutput("sr", 0, sr))
        return built
    if options.secondary_captures:
        for index, key in enumerate(key_slices):
            sc = build_secondary_capture(summary, key, index=index, total=len(key_slices), series_number=base)
            built.append(BuiltOutput("sc", index, sc))
    if options.key_object_selection and key_slices:
        kos = build_key_object_selection(summary, key_slices, series_number=base + SERIES_NUMBER_OFFSET["kos"])
        built.append(BuiltOutput("kos", 0, kos))
    if options.structured_report:
        sr = build_structured_report(summary, key_slices, evidence, series_number=base + SERIES_NUMBER_OFFSET["sr"])
        built.append(BuiltOutput("sr", 0, sr))
    return built


def encode(dataset: Dataset) -> bytes:
    """The Part 10 file bytes of ``dataset`` (preamble, file meta, dataset in its transfer syntax)."""
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def transfer_syntax(dataset: Dataset) -> UID:
    return UID(dataset.file_meta.TransferSyntaxUID)
