"""Synthetic MR series: valid tags, geometry, and pixels that round-trip exactly in every syntax we write."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    MRImageStorage,
)

from tests.support.dicom_files import SYNTHETIC_SYNTAXES
from triaged.dicom.synthetic import scale_to_stored, write_mr_series
from triaged.dicom.uids import validate_uid


def _slices(n: int = 3, shape: tuple[int, int] = (40, 32)) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.random(shape) * 100 - 20 for _ in range(n)]


@pytest.mark.parametrize(
    "syntax",
    SYNTHETIC_SYNTAXES,
)
def test_round_trip_pixels_equal_scaled_input(tmp_path: Path, syntax: str) -> None:
    slices = _slices()
    paths = write_mr_series(slices, tmp_path, transfer_syntax_uid=syntax, bits_stored=12, seed=1)
    expected = scale_to_stored(slices, 12)
    assert len(paths) == 3
    for path, want in zip(paths, expected, strict=True):
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == syntax
        assert ds.BitsStored == 12
        assert ds.HighBit == 11
        np.testing.assert_array_equal(ds.pixel_array, want)


def test_tags_and_geometry(tmp_path: Path) -> None:
    paths = write_mr_series(
        _slices(4), tmp_path, seed="abc", slice_thickness=4.0, pixel_spacing=0.5, series_number=7, rescale=(2.0, -5.0)
    )
    datasets = [pydicom.dcmread(p) for p in paths]
    assert {ds.SeriesInstanceUID for ds in datasets} == {datasets[0].SeriesInstanceUID}
    assert len({ds.SOPInstanceUID for ds in datasets}) == 4
    for index, ds in enumerate(datasets):
        assert ds.SOPClassUID == MRImageStorage
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        for uid in (ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.FrameOfReferenceUID):
            validate_uid(uid)
        assert ds.Modality == "MR"
        assert ds.InstanceNumber == index + 1
        assert float(ds.ImagePositionPatient[2]) == pytest.approx(index * 4.0)
        assert float(ds.SliceLocation) == pytest.approx(index * 4.0)
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert [float(v) for v in ds.PixelSpacing] == [0.5, 0.5]
        assert ds.SeriesNumber == 7
        assert float(ds.RescaleSlope) == 2.0
        assert float(ds.RescaleIntercept) == -5.0
        assert ds.PixelData is not None


def test_seed_gives_deterministic_uids(tmp_path: Path) -> None:
    a = [pydicom.dcmread(p).SOPInstanceUID for p in write_mr_series(_slices(), tmp_path / "a", seed=3)]
    b = [pydicom.dcmread(p).SOPInstanceUID for p in write_mr_series(_slices(), tmp_path / "b", seed=3)]
    c = [pydicom.dcmread(p).SOPInstanceUID for p in write_mr_series(_slices(), tmp_path / "c")]
    assert a == b
    assert a != c


def test_given_uids_are_used(tmp_path: Path) -> None:
    paths = write_mr_series(_slices(1), tmp_path, study_instance_uid="1.2.3", series_instance_uid="1.2.3.4")
    ds = pydicom.dcmread(paths[0])
    assert (ds.StudyInstanceUID, ds.SeriesInstanceUID) == ("1.2.3", "1.2.3.4")


def test_uint8_input_and_8_bit_storage(tmp_path: Path) -> None:
    image = np.arange(256, dtype=np.uint8).reshape(16, 16)
    ds = pydicom.dcmread(write_mr_series([image], tmp_path, bits_stored=8)[0])
    assert ds.BitsAllocated == 8
    np.testing.assert_array_equal(ds.pixel_array, image)


def test_bad_input_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_mr_series([], tmp_path)
    with pytest.raises(ValueError):
        write_mr_series([np.zeros((2, 2, 2))], tmp_path)
    with pytest.raises(ValueError):
        write_mr_series([np.zeros((4, 4)), np.zeros((5, 4))], tmp_path)


def test_images_of_no_known_position_carry_none(tmp_path: Path) -> None:
    """The demo's folder-of-images series: no invented position, so decoding gives no geometry to act on (no
    reformat, no below-the-brain rule) and the slices stay in instance order."""
    from triaged.dicom.pixels import decode_series
    from triaged.pipeline import slice_geometry

    paths = write_mr_series(_slices(4), tmp_path, seed=3, positions=False)
    for path in paths:
        ds = pydicom.dcmread(path)
        assert "ImagePositionPatient" not in ds and "SliceLocation" not in ds and "SpacingBetweenSlices" not in ds
    decoded = decode_series(paths)
    assert [s.instance_number for s in decoded.slices] == [1, 2, 3, 4]
    assert slice_geometry(decoded.slices) is None
