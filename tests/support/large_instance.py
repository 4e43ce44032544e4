"""Huge enhanced multi-frame MR instances for the bounded-memory tests, written without holding them in memory.

The header is a real pydicom data set; the Pixel Data element is appended by hand and its value left as
a hole (``truncate``), so a 512 MiB file costs neither RAM nor disk blocks to make, and reads as zeros.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import EnhancedMRImageStorage, ExplicitVRLittleEndian, generate_uid

FRAME = 512  # rows = columns; 16-bit: 512 KiB per frame


def write_large_enhanced_mr(path: Path, mib: int, *, seed: str = "0") -> Path:
    """An Enhanced MR Image Storage file of ``mib`` MiB of pixel data (Explicit VR Little Endian)."""
    frames = mib * 2  # 512 KiB per frame
    ds = Dataset()
    ds.SOPClassUID = EnhancedMRImageStorage
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["large", seed, str(mib)])
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["large-study", seed])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["large-series", seed])
    ds.Modality = "MR"
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.NumberOfFrames = frames
    ds.Rows = ds.Columns = FRAME
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    length = frames * FRAME * FRAME * 2
    with path.open("r+b") as f:
        f.seek(0, 2)
        f.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, length))
        f.truncate(f.tell() + length)
    return path


def dataset_sha256(path: Path, offset: int) -> str:
    """sha256 of a file's bytes from ``offset`` on, read piecewise."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        f.seek(offset)
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
