"""Decode stored MR instances into float32 2-D slices in patient order (design: pipeline, issue item 2).

Tolerant about what we read, strict about what we rely on (style P9): every transfer syntax pydicom +
pylibjpeg can decode, the modality LUT (classic Rescale or the Enhanced MR Pixel Value Transformation),
signed and 12-bit data, MONOCHROME1 (inverted so bright is always signal), Enhanced MR multi-frame (one
slice per frame with its own position). What cannot be a 2-D greyscale brain slice (colour, Siemens
mosaic, truncated or missing pixel data) raises a permanent :class:`~triaged.errors.PixelDecodeError`.
This module knows nothing of the model; the pipeline turns :class:`SeriesHeader` into the ML metadata.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from triaged.errors import PixelDecodeError

__all__ = ["DecodedSeries", "DecodedSlice", "PixelDecodeError", "SeriesHeader", "decode_instance", "decode_series"]

FloatImage = npt.NDArray[np.float32]

_SIEMENS_MOSAIC_COUNT = (0x0019, 0x100A)
_SIEMENS_B_VALUE = (0x0019, 0x100C)
_GE_B_VALUE = (0x0043, 0x1039)
_PHILIPS_B_VALUE = (0x2001, 0x1003)
_DIFFUSION_B_VALUE = (0x0018, 0x9087)


@dataclass(frozen=True)
class DecodedSlice:
    """One 2-D slice: rescaled float pixels plus where it came from and where it lies."""

    pixels: FloatImage
    sop_instance_uid: str
    frame_number: int | None
    instance_number: int | None
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None = None  # mm (between rows, between columns)


@dataclass(frozen=True)
class SeriesHeader:
    """Technical header values the assessability gate needs (no patient attributes)."""

    modality: str
    body_part_examined: str
    series_description: str
    protocol_name: str
    image_type: tuple[str, ...]
    scanning_sequence: tuple[str, ...]
    sequence_variant: tuple[str, ...]
    diffusion_b_values: tuple[float, ...]
    echo_time: float | None = None
    repetition_time: float | None = None
    inversion_time: float | None = None


@dataclass(frozen=True)
class DecodedSeries:
    slices: tuple[DecodedSlice, ...]
    header: SeriesHeader


def _strings(value: Any) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, str | bytes):
        return (str(value).strip(),)
    return tuple(str(item).strip() for item in value)


def _floats(value: Any) -> tuple[float, ...] | None:
    try:
        values = tuple(float(item) for item in value)
    except (TypeError, ValueError):
        return None
    return values


def _first_item(ds: Dataset, keyword: str) -> Dataset | None:
    seq = ds.get(keyword)
    return seq[0] if seq else None


def _functional(frame_group: Dataset | None, shared: Dataset | None, keyword: str) -> Dataset | None:
    """A functional-group macro item: the per-frame one wins over the shared one (PS3.3 C.7.6.16)."""
    for group in (frame_group, shared):
        if group is not None and (item := _first_item(group, keyword)) is not None:
            return item
    return None


def _check_greyscale(ds: Dataset, where: str, *, allow_mosaic: bool = False) -> None:
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise PixelDecodeError(
            f"{where}: colour or non-greyscale image ({photometric or 'no PhotometricInterpretation'}, "
            f"{samples} samples per pixel) cannot be a brain MR slice"
        )
    image_type = {value.upper() for value in _strings(ds.get("ImageType"))}
    if not allow_mosaic and ("MOSAIC" in image_type or _SIEMENS_MOSAIC_COUNT in ds):
        raise PixelDecodeError(f"{where}: Siemens mosaic (a whole volume tiled in one image) is not supported")


def _decode_array(ds: Dataset, where: str) -> npt.NDArray[Any]:
    try:
        array = ds.pixel_array
    except AttributeError as exc:
        raise PixelDecodeError(f"{where}: no pixel data") from exc
    except (ValueError, RuntimeError, NotImplementedError, KeyError, TypeError) as exc:
        message = " ".join(str(exc).split())[:300]
        raise PixelDecodeError(f"{where}: pixel data cannot be decoded ({type(exc).__name__}: {message})") from exc
    return np.asarray(array)


def _rescale(
    frame: npt.NDArray[Any], transform: Dataset | None, ds: Dataset, bits_stored: int, signed: bool
) -> tuple[FloatImage, float, float]:
    """Apply slope/intercept; also return the rescaled range of possible stored values (for MONOCHROME1)."""
    source = transform if transform is not None else ds
    slope = float(source.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(source.get("RescaleIntercept", 0.0) or 0.0)
    if signed:
        low_stored, high_stored = -(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1
    else:
        low_stored, high_stored = 0, (1 << bits_stored) - 1
    out = frame.astype(np.float32) * np.float32(slope) + np.float32(intercept)
    ends = sorted((low_stored * slope + intercept, high_stored * slope + intercept))
    return out, ends[0], ends[1]


def decode_instance(ds: Dataset, where: str = "instance", *, allow_mosaic: bool = False) -> list[DecodedSlice]:
    """Decode one dataset to one slice per frame (classic: one; Enhanced MR: NumberOfFrames).

    ``allow_mosaic`` decodes a Siemens mosaic as one tiled image (for inspection, never for inference).
    """
    if not any(keyword in ds for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise PixelDecodeError(f"{where}: no pixel data")
    _check_greyscale(ds, where, allow_mosaic=allow_mosaic)
    array = _decode_array(ds, where)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if array.ndim == 2 and frames == 1:
        array = array[np.newaxis]
    if array.ndim != 3 or array.shape[0] != frames or min(array.shape[1:]) < 2:
        raise PixelDecodeError(f"{where}: pixel data of shape {array.shape} is not {frames} 2-D frame(s)")
    bits_stored = int(ds.get("BitsStored", 16) or 16)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    monochrome1 = str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1"
    shared = _first_item(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    sop_instance_uid = str(ds.get("SOPInstanceUID", ""))
    instance_number = int(ds.InstanceNumber) if ds.get("InstanceNumber") not in (None, "") else None
    slices: list[DecodedSlice] = []
    for index in range(frames):
        group = per_frame[index] if per_frame is not None and index < len(per_frame) else None
        transform = _functional(group, shared, "PixelValueTransformationSequence")
        pixels, low, high = _rescale(array[index], transform, ds, bits_stored, signed)
        if monochrome1:
            pixels = np.float32(low + high) - pixels
        plane_position = _functional(group, shared, "PlanePositionSequence")
        plane_orientation = _functional(group, shared, "PlaneOrientationSequence")
        position = _floats((plane_position or ds).get("ImagePositionPatient"))
        orientation = _floats((plane_orientation or ds).get("ImageOrientationPatient"))
        spacing = _floats((_functional(group, shared, "PixelMeasuresSequence") or ds).get("PixelSpacing"))
        if not np.isfinite(pixels).all():
            raise PixelDecodeError(f"{where}: frame {index + 1} has non-finite pixel values")
        slices.append(
            DecodedSlice(
                pixels=np.ascontiguousarray(pixels, dtype=np.float32),
                sop_instance_uid=sop_instance_uid,
                frame_number=index + 1 if frames > 1 or per_frame is not None else None,
                instance_number=instance_number,
                position=(position[0], position[1], position[2]) if position and len(position) == 3 else None,
                orientation=orientation if orientation and len(orientation) == 6 else None,
                pixel_spacing=(spacing[0], spacing[1]) if spacing and len(spacing) == 2 else None,
            )
        )
    return slices


def shared_orientation(slices: Sequence[DecodedSlice]) -> tuple[float, ...] | None:
    """The one orientation of ``slices`` when every slice has a position and all share it, else ``None``.

    Why: only then do positions along one slice normal mean anything, for sorting (:func:`sort_slices`) as for the
    geometry a reformat relies on (``pipeline.slice_geometry``).
    """
    orientations = {s.orientation for s in slices}
    if not slices or len(orientations) != 1 or any(s.position is None for s in slices):
        return None
    return next(iter(orientations))


def sort_slices(slices: Sequence[DecodedSlice]) -> list[DecodedSlice]:
    """Order along the slice normal when every slice has a position and one orientation; else by numbers."""
    shared = shared_orientation(slices)
    if shared is not None:
        orientation = np.asarray(shared, dtype=np.float64)
        normal = np.cross(orientation[:3], orientation[3:])
        if np.linalg.norm(normal) > 0:
            return sorted(
                slices,
                key=lambda s: (float(np.dot(normal, np.asarray(s.position))), s.instance_number or 0),
            )
    return sorted(slices, key=lambda s: (s.instance_number or 0, s.frame_number or 0, s.sop_instance_uid))


def _b_values(ds: Dataset) -> set[float]:
    found: set[float] = set()
    for tag in (_DIFFUSION_B_VALUE, _SIEMENS_B_VALUE, _PHILIPS_B_VALUE):
        if tag in ds and ds[tag].value not in (None, b""):
            values = _floats(ds[tag].value if isinstance(ds[tag].value, list | tuple) else [ds[tag].value])
            found.update(values or ())
    if _GE_B_VALUE in ds:
        values = _floats(ds[_GE_B_VALUE].value)
        if values:
            found.add(values[0] % 1e9)  # GE stores the b-value offset by 1e9 in the first value
    for group in ds.get("PerFrameFunctionalGroupsSequence", []):
        if (mr_diffusion := _first_item(group, "MRDiffusionSequence")) is not None:
            found.update(_floats([mr_diffusion.get("DiffusionBValue")]) or ())
    return found


def read_header(ds: Dataset, b_values: set[float]) -> SeriesHeader:
    image_type = _strings(ds.get("ImageType"))
    frame_type = _strings(getattr(_first_item(ds, "SharedFunctionalGroupsSequence"), "FrameType", None))
    return SeriesHeader(
        modality=str(ds.get("Modality", "")),
        body_part_examined=str(ds.get("BodyPartExamined", "")),
        series_description=str(ds.get("SeriesDescription", "")),
        protocol_name=str(ds.get("ProtocolName", "")),
        image_type=image_type or frame_type,
        scanning_sequence=_strings(ds.get("ScanningSequence")),
        sequence_variant=_strings(ds.get("SequenceVariant")),
        diffusion_b_values=tuple(sorted(b_values)),
        echo_time=_timing(ds, "EchoTime", "EffectiveEchoTime", "MREchoSequence"),
        repetition_time=_timing(ds, "RepetitionTime", "RepetitionTime", "MRTimingAndRelatedParametersSequence"),
        inversion_time=_timing(ds, "InversionTime", "InversionTimes", "MRModifierSequence"),
    )


def _timing(ds: Dataset, keyword: str, enhanced_keyword: str, sequence: str) -> float | None:
    """A sequence timing in ms from the classic attribute or, for enhanced MR, the first frame's functional group."""
    values = _floats([ds.get(keyword)]) if ds.get(keyword) not in (None, "") else None
    if values:
        return values[0]
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        item = _functional(_first_item(ds, groups), None, sequence)
        if item is not None and item.get(enhanced_keyword) not in (None, ""):
            raw = item.get(enhanced_keyword)
            found = _floats(raw if isinstance(raw, list | tuple) else [raw])
            if found:
                return found[0]
    return None


def read_dataset(path: Path) -> Dataset:
    try:
        return pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise PixelDecodeError(f"{path.name}: not a readable DICOM file ({type(exc).__name__})") from exc


def decode_series(paths: Sequence[Path]) -> DecodedSeries:
    """Decode every file of one series; slices sorted in patient order."""
    if not paths:
        raise PixelDecodeError("series has no instances")
    slices: list[DecodedSlice] = []
    b_values: set[float] = set()
    header_ds: Dataset | None = None
    for path in paths:
        ds = read_dataset(path)
        header_ds = header_ds or ds
        b_values |= _b_values(ds)
        slices.extend(decode_instance(ds, where=f"instance {ds.get('InstanceNumber', '?')}"))
    assert header_ds is not None
    return DecodedSeries(slices=tuple(sort_slices(slices)), header=read_header(header_ds, b_values))


def read_series_header(paths: Sequence[Path]) -> tuple[SeriesHeader, int]:
    """Header and image count of a series without touching pixel data (to explain an undecodable series)."""
    if not paths:
        raise PixelDecodeError("series has no instances")
    b_values: set[float] = set()
    first: Dataset | None = None
    images = 0
    for path in paths:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            raise PixelDecodeError(f"{path.name}: not a readable DICOM file ({type(exc).__name__})") from exc
        first = first or ds
        b_values |= _b_values(ds)
        images += int(ds.get("NumberOfFrames", 1) or 1)
    assert first is not None
    return read_header(first, b_values), images
