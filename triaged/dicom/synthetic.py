"""Build valid classic MR Image Storage series from 2-D arrays.

Used by the demo (tumour cases exist only as 2-D images, so DICOM series are built from labelled slices),
by pipeline tests, and by the receiver tests and ingest benchmark. Patient data is fictitious by default.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
)

UNCOMPRESSED_SYNTAXES = frozenset(
    {ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian}
)
# Root for deterministic synthetic UIDs: 2.25 + an integer (PS3.5 B.2), derived from a seed.
_UUID_ROOT = "2.25."


def derived_uid(*parts: object) -> str:
    """A deterministic ``2.25.<int>`` UID from ``parts`` (same parts → same UID)."""
    digest = hashlib.sha256("|".join(str(part) for part in parts).encode()).digest()
    return _UUID_ROOT + str(int.from_bytes(digest[:16], "big"))


def scale_to_stored(slices: Sequence[npt.ArrayLike], bits_stored: int) -> list[npt.NDArray[np.uint16]]:
    """Scale slices linearly (one min/max for the whole series) into ``[0, 2**bits_stored - 1]``.

    One range for the series keeps relative intensities between slices, as a scanner would.
    """
    if not 1 <= bits_stored <= 16:
        raise ValueError("bits_stored must be between 1 and 16")
    arrays = [np.asarray(s, dtype=np.float64) for s in slices]
    if not arrays:
        raise ValueError("at least one slice is required")
    for array in arrays:
        if array.ndim != 2:
            raise ValueError(f"slices must be 2-D, got shape {array.shape}")
        if array.shape != arrays[0].shape:
            raise ValueError("all slices must have the same shape")
        if not np.isfinite(array).all():
            raise ValueError("slices must be finite")
    low = min(float(a.min()) for a in arrays)
    high = max(float(a.max()) for a in arrays)
    top = (1 << bits_stored) - 1
    span = high - low
    scaled = []
    for array in arrays:
        unit = (array - low) / span if span > 0 else np.zeros_like(array)
        scaled.append(np.rint(unit * top).astype(np.uint16))
    return scaled


def _base_dataset(
    *,
    study_instance_uid: str,
    series_instance_uid: str,
    frame_of_reference_uid: str,
    series_description: str,
    patient_name: str,
    patient_id: str,
    series_number: int,
    modality: str,
    body_part_examined: str,
    image_type: Sequence[str],
    scanning_sequence: Sequence[str],
    sequence_variant: Sequence[str],
) -> Dataset:
    now = datetime.now(UTC)
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = list(image_type)
    ds.SOPClassUID = MRImageStorage
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.AccessionNumber = ""
    ds.Modality = modality
    ds.Manufacturer = "triaged synthetic"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "SYNTHETIC BRAIN MR"
    ds.SeriesDescription = series_description
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.BodyPartExamined = body_part_examined
    ds.ScanningSequence = list(scanning_sequence)
    ds.SequenceVariant = list(sequence_variant)
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "2D"
    ds.RepetitionTime = "500"
    ds.EchoTime = "15"
    ds.EchoTrainLength = "1"
    ds.MagneticFieldStrength = "1.5"
    ds.StudyInstanceUID = study_instance_uid
    ds.SeriesInstanceUID = series_instance_uid
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SamplesPerPixel = 1
    ds.PixelRepresentation = 0
    return ds


def write_mr_series(
    slices: Sequence[npt.ArrayLike],
    out_dir: Path,
    *,
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    series_description: str = "T1 AX POST GD",
    patient_name: str = "TRIAGED^DEMO",
    patient_id: str = "DEMO0001",
    series_number: int = 1,
    pixel_spacing: float = 0.9,
    slice_thickness: float = 5.0,
    positions: bool = True,
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "M", "ND"),
    scanning_sequence: Sequence[str] = ("SE",),
    sequence_variant: Sequence[str] = ("NONE",),
    bits_stored: int = 16,
    transfer_syntax_uid: str = ExplicitVRLittleEndian,
    rescale: tuple[float, float] | None = None,
    photometric: str = "MONOCHROME2",
    body_part_examined: str = "BRAIN",
    modality: str = "MR",
    seed: int | str | None = None,
    attributes: Mapping[str, object] | None = None,
) -> list[Path]:
    """Write one axial MR Image Storage file per slice into ``out_dir``; return the paths in slice order.

    Pixels are scaled with :func:`scale_to_stored` (unsigned, ``bits_stored`` bits in 8 or 16 allocated).
    ``rescale`` is ``(slope, intercept)`` written as the modality LUT. With ``seed`` every UID is derived
    from it, so the same call writes byte-identical UIDs; without, fresh random ``2.25`` UIDs are used.
    Compressed transfer syntaxes (RLE, JPEG 2000, JPEG-LS) use pydicom's encoders. ``attributes`` (keyword →
    value) are set on every instance last, e.g. the ``EchoTime``/``RepetitionTime``/``InversionTime`` of a FLAIR.
    ``positions=False`` leaves out where each slice lies (ImagePositionPatient, SliceLocation, SpacingBetweenSlices),
    for images that are not known to be one volume: no position is better than an invented one, which would let
    the reformat and the below-the-brain rule act on a geometry nobody measured. Such files are kept in the
    instance-number order and are not conformant MR objects (the position is Type 1), so only the demo uses it.
    """
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError("photometric must be MONOCHROME1 or MONOCHROME2")
    if pixel_spacing <= 0 or slice_thickness <= 0:
        raise ValueError("pixel_spacing and slice_thickness must be positive")
    syntax = UID(transfer_syntax_uid)
    stored = scale_to_stored(slices, bits_stored)
    bits_allocated = 8 if bits_stored <= 8 else 16
    salt: object = seed if seed is not None else np.random.default_rng().integers(1 << 62)
    study_uid = study_instance_uid or derived_uid("study", salt)
    series_uid = series_instance_uid or derived_uid("series", salt, study_uid, series_number)
    base = _base_dataset(
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        frame_of_reference_uid=derived_uid("for", salt, study_uid),
        series_description=series_description,
        patient_name=patient_name,
        patient_id=patient_id,
        series_number=series_number,
        modality=modality,
        body_part_examined=body_part_examined,
        image_type=image_type,
        scanning_sequence=scanning_sequence,
        sequence_variant=sequence_variant,
    )
    for keyword, value in (attributes or {}).items():
        setattr(base, keyword, value)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for index, pixels in enumerate(stored):
        ds = _instance(
            base,
            pixels,
            index,
            pixel_spacing=pixel_spacing,
            slice_thickness=slice_thickness,
            bits_stored=bits_stored,
            bits_allocated=bits_allocated,
            positions=positions,
        )
        ds.SOPInstanceUID = derived_uid("instance", salt, series_uid, index)
        ds.PhotometricInterpretation = photometric
        if rescale is not None:
            ds.RescaleSlope, ds.RescaleIntercept = (f"{rescale[0]:g}", f"{rescale[1]:g}")
            ds.RescaleType = "US"
        _encode(ds, pixels, syntax, bits_allocated)
        path = out_dir / f"{index + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _instance(
    base: Dataset,
    pixels: npt.NDArray[np.uint16],
    index: int,
    *,
    pixel_spacing: float,
    slice_thickness: float,
    bits_stored: int,
    bits_allocated: int,
    positions: bool,
) -> Dataset:
    ds = Dataset()
    ds.update(base)
    rows, columns = pixels.shape
    if positions:
        location = index * slice_thickness
        # Centre the slice on the isocentre in x/y; slices stack along +z (feet to head).
        ds.ImagePositionPatient = [
            f"{-columns * pixel_spacing / 2:g}",
            f"{-rows * pixel_spacing / 2:g}",
            f"{location:g}",
        ]
        ds.SliceLocation = f"{location:g}"
        ds.SpacingBetweenSlices = f"{slice_thickness:g}"
    ds.InstanceNumber = index + 1
    ds.SliceThickness = f"{slice_thickness:g}"
    ds.PixelSpacing = [f"{pixel_spacing:g}", f"{pixel_spacing:g}"]
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.InstanceCreationDate = base.ContentDate
    ds.InstanceCreationTime = base.ContentTime
    return ds


def _encode(ds: Dataset, pixels: npt.NDArray[np.uint16], syntax: UID, bits_allocated: int) -> None:
    dtype = np.uint8 if bits_allocated == 8 else np.uint16
    array = pixels.astype(dtype)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    if syntax in UNCOMPRESSED_SYNTAXES:
        ds.file_meta.TransferSyntaxUID = syntax
        data = array.astype(array.dtype.newbyteorder(">")) if syntax == ExplicitVRBigEndian else array
        ds.PixelData = data.tobytes()
        ds["PixelData"].VR = "OB" if bits_allocated == 8 else "OW"
        return
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PixelData = array.tobytes()
    ds["PixelData"].VR = "OB" if bits_allocated == 8 else "OW"
    ds.compress(syntax, array)
