"""Hand-encoded file meta equals pydicom's encoding; identifiers parse in every transfer syntax."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    UID,
)

from tests.support.dicom_files import SYNTHETIC_SYNTAXES
from triaged.dicom.part10 import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    file_meta_bytes,
    read_identifiers,
)
from triaged.dicom.synthetic import write_mr_series


@pytest.mark.parametrize(
    ("sop_class", "sop_instance", "syntax"),
    [
        ("1.2.840.10008.5.1.4.1.1.4", "1.2.3.4", "1.2.840.10008.1.2.1"),  # even lengths
        ("1.2.840.10008.5.1.4.1.1.4.1", "1.2.3.45", "1.2.840.10008.1.2"),  # odd lengths are padded
    ],
)
def test_file_meta_matches_pydicom(sop_class: str, sop_instance: str, syntax: str) -> None:
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = UID(syntax)
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    buffer = BytesIO()
    buffer.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)  # type: ignore[arg-type]
    assert file_meta_bytes(sop_class, sop_instance, syntax) == buffer.getvalue()


@pytest.mark.parametrize(
    "syntax",
    SYNTHETIC_SYNTAXES,
)
def test_identifiers_in_every_syntax(tmp_path: Path, syntax: str) -> None:
    (path,) = write_mr_series([np.random.default_rng(0).random((32, 32))], tmp_path, transfer_syntax_uid=syntax, seed=1)
    source = pydicom.dcmread(path)
    data = path.read_bytes()
    offset = 144 + int.from_bytes(data[140:144], "little")
    ds = read_identifiers(data[offset:], syntax)
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality"):
        assert ds[keyword].value == source[keyword].value
    assert ds.InstanceNumber == 1
    assert "PixelData" not in ds
