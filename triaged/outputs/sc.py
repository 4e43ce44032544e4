"""Secondary Capture of a key slice (highdicom ``sc``): the slice, its Grad-CAM overlay and the burned-in banner.

The picture is drawn by render.py; this module turns it into an SC instance in the source study that
references the source image, with identities derived from the result (summary.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from triaged import __version__
from triaged.dicom.pixels import DecodedSlice, decode_instance
from triaged.errors import OutputBuildError, PixelDecodeError
from triaged.outputs.render import Banner, render_secondary_capture
from triaged.outputs.summary import (
    MANUFACTURER,
    MANUFACTURER_MODEL_NAME,
    KeySlice,
    TriageSummary,
    contributing_equipment,
    decision_line,
    instance_uid,
    pretty_label,
    series_description,
    series_uid,
)


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


AXIAL_ORIENTATION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)  # along a row: to patient left; down a column: to posterior


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
    slice_line = f"Key image {index + 1} of {total}" + (
        " (axial reformat)" if key is not None and key.reformatted else ""
    )
    if key is not None and key.tumour_probability is not None:
        slice_line += f": slice tumour probability {key.tumour_probability:.2f}"
    headline = f"{'AI TRIAGE URGENT' if summary.urgent else 'AI TRIAGE'}: {pretty_label(summary.label)}"
    return Banner(
        headline,
        (
            f"Series class probabilities: {probs}",
            decision_line(summary),
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
    if key.pixels is not None:  # a slice of the axial reformat: rows anterior to posterior, columns right to left
        image, orientation = key.pixels, patient_orientation(AXIAL_ORIENTATION)
    else:
        decoded = source_slice(source, key.frame_number)
        image, orientation = decoded.pixels, patient_orientation(decoded.orientation)
    pixels = render_secondary_capture(image, key.cam, banner_for(summary, key, index, total))
    try:
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=source,
            pixel_array=pixels,
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            # highdicom takes one letter per direction; an oblique one ("LP") is set in full below
            patient_orientation=(orientation[0][0], orientation[1][0]) if orientation else ("L", "P"),
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
    # Type 2: unknown stays empty rather than a made-up direction; oblique keeps all its letters (PS3.3 C.7.6.1.1.1)
    sc.PatientOrientation = list(orientation) if orientation is not None else []
    if source.get("BodyPartExamined"):
        sc.BodyPartExamined = source.BodyPartExamined
    sc.BurnedInAnnotation = "YES"
    if source.get("RecognizableVisualFeatures"):  # a sagittal head image may show a face: never assume "NO"
        sc.RecognizableVisualFeatures = source.RecognizableVisualFeatures
    sc.ImageComments = "AI TRIAGE - NOT FOR DIAGNOSTIC USE"
    derivation = f"Grad-CAM overlay and triage banner by {summary.model_name} {summary.model_version}"
    if key.reformatted:
        derivation = f"Axial reformat of the acquired 3-D volume; {derivation[0].lower()}{derivation[1:]}"
    sc.DerivationDescription = derivation[:1024]
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
