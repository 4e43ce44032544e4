"""Pixel decoding over the real DICOM files in ../shared/data/dicom and synthetic edge cases."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless, generate_uid

from tests.conftest import shared_data
from triaged.dicom.pixels import PixelDecodeError, decode_instance, decode_series, read_dataset
from triaged.dicom.synthetic import write_mr_series

pytestmark = [
    pytest.mark.filterwarnings("ignore:End of file reached before delimiter:UserWarning"),
    pytest.mark.filterwarnings("ignore:The pixel data is .* bytes long, which indicates it contains:UserWarning"),
]

UIH_T1 = "neurolabusc_dcm_qa_uih/In/DTI_132225/t1_gre_fsp_3d_sag__132750"
XA30_MPRAGE = "neurolabusc_dcm_qa_xa30/In/6_anat-T1w_acq-tfl"


def _index() -> list[dict[str, str]]:
    with (shared_data() / "dicom" / "index.csv").open(encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_every_indexed_file_decodes_or_fails_clearly() -> None:
    root = shared_data() / "dicom"
    decoded = refused = 0
    for row in _index():
        path = root / row["path"]
        try:
            slices = decode_instance(read_dataset(path), where=row["path"])
        except PixelDecodeError as exc:
            refused += 1
            message = str(exc)
            if row["decode_ok"] == "no":
                assert "no pixel data" in message or "cannot be decoded" in message, message
            else:
                assert "mosaic" in message, f"{row['path']}: unexpected refusal {message}"
            continue
        assert row["decode_ok"] == "yes", row["path"]
        decoded += 1
        frames = int(row["NumberOfFrames"] or 1)
        assert len(slices) == frames
        for item in slices:
            assert item.pixels.dtype == np.float32
            assert item.pixels.shape == (int(row["Rows"]), int(row["Columns"]))
            assert np.isfinite(item.pixels).all()
    assert decoded >= 190
    assert refused == 18  # 16 Siemens mosaics (incl. the 12-bit ones) + the two broken files


def test_broken_files_raise_permanent_errors() -> None:
    root = shared_data() / "dicom"
    truncated = next(root.rglob("MR_truncated.dcm"))
    with pytest.raises(PixelDecodeError, match="cannot be decoded") as info:
        decode_instance(read_dataset(truncated))
    assert info.value.retryable is False
    too_short = next(root.rglob("emri_small_jpeg_2k_lossless_too_short.dcm"))
    with pytest.raises(PixelDecodeError, match="no pixel data"):
        decode_instance(read_dataset(too_short))


def test_enhanced_mr_one_slice_per_frame_in_position_order() -> None:
    paths = sorted((shared_data() / "dicom" / XA30_MPRAGE).iterdir())
    series = decode_series(paths)
    assert len(series.slices) == 96
    assert sorted(s.frame_number or 0 for s in series.slices) == list(range(1, 97))
    orientation = np.asarray(series.slices[0].orientation)
    normal = np.cross(orientation[:3], orientation[3:])
    along = [float(np.dot(normal, s.position)) for s in series.slices]  # type: ignore[arg-type]
    assert along == sorted(along)
    assert series.header.body_part_examined == "BRAIN"
    assert series.header.image_type[:2] == ("ORIGINAL", "PRIMARY")


def test_classic_series_sorted_by_position_not_file_order() -> None:
    paths = sorted((shared_data() / "dicom" / UIH_T1).iterdir())
    random.Random(3).shuffle(paths)
    series = decode_series(paths)
    assert len(series.slices) == 32
    orientation = np.asarray(series.slices[0].orientation)
    normal = np.cross(orientation[:3], orientation[3:])
    along = [float(np.dot(normal, s.position)) for s in series.slices]  # type: ignore[arg-type]
    assert along == sorted(along)
    assert series.header.scanning_sequence == ("GR", "IR")


def test_signed_12_bit_values() -> None:
    path = shared_data() / "dicom" / "neurolabusc_dcm_qa_12bit/In/12bitSigned_0x0F0F.dcm"
    ds = pydicom.dcmread(path)
    with pytest.raises(PixelDecodeError, match="mosaic"):
        decode_instance(ds)
    pixels = decode_instance(ds, allow_mosaic=True)[0].pixels
    raw = np.frombuffer(ds.PixelData, dtype="<u2").reshape(ds.Rows, ds.Columns)
    low12 = (raw & 0x0FFF).astype(np.int32)
    expected = np.where(low12 >= 2048, low12 - 4096, low12)  # two's complement in 12 bits; high nibble ignored
    assert (pixels == expected).all()
    assert pixels.min() < 0


def _ramp() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.random((32, 40)) * 1000 + i for i in range(4)]


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    mono2 = write_mr_series(_ramp(), tmp_path / "m2", bits_stored=12, seed=1)
    mono1 = write_mr_series(_ramp(), tmp_path / "m1", bits_stored=12, seed=1, photometric="MONOCHROME1")
    a = decode_series(mono2).slices
    b = decode_series(mono1).slices
    for x, y in zip(a, b, strict=True):
        # same stored values; MONOCHROME1 decodes to (2**12 - 1) - value, so bright is always signal
        assert np.array_equal(x.pixels + y.pixels, np.full(x.pixels.shape, 4095, dtype=np.float32))


def test_modality_lut_applied(tmp_path: Path) -> None:
    paths = write_mr_series(_ramp(), tmp_path / "r", bits_stored=12, rescale=(2.0, -100.0), seed=2)
    decoded = decode_series(paths).slices[0].pixels
    stored = pydicom.dcmread(paths[0]).pixel_array.astype(np.float32)
    assert np.array_equal(decoded, stored * 2 - 100)


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless])
def test_compressed_equals_uncompressed(tmp_path: Path, syntax: str) -> None:
    plain = decode_series(write_mr_series(_ramp(), tmp_path / "plain", seed=4)).slices
    packed = decode_series(write_mr_series(_ramp(), tmp_path / "packed", seed=4, transfer_syntax_uid=syntax)).slices
    for x, y in zip(plain, packed, strict=True):
        assert np.array_equal(x.pixels, y.pixels)


def test_colour_image_refused(tmp_path: Path) -> None:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "MR"
    ds.Rows, ds.Columns = 8, 8
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = bytes(8 * 8 * 3)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    with pytest.raises(PixelDecodeError, match="colour"):
        decode_instance(ds)


def test_unreadable_file_and_empty_series(tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    with pytest.raises(PixelDecodeError, match="not a readable DICOM file"):
        decode_series([junk])
    with pytest.raises(PixelDecodeError, match="no instances"):
        decode_series([])
