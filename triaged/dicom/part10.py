"""Just enough DICOM Part 10 for the hot path: encode our File Meta Information, read a dataset's identifiers.

Both run once per received instance, so they avoid pydicom's general machinery: the meta group is encoded
directly (PS3.10 section 7.1, always Explicit VR Little Endian), and the dataset is parsed only up to
(0020,0013) Instance Number — the pixel data and everything after the identifiers is never touched.
"""

from __future__ import annotations

import struct
import zlib
from io import BytesIO
from typing import BinaryIO

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

#: Our Implementation Class UID (PS3.7 D.3.3.2), a fixed 2.25 UID derived from the project name.
IMPLEMENTATION_CLASS_UID = "2.25.198377432911938069711383213521458125612"
IMPLEMENTATION_VERSION_NAME = "TRIAGED_0_1"

IDENTIFYING_TAGS = [
    Tag(0x0008, 0x0016),  # SOPClassUID
    Tag(0x0008, 0x0018),  # SOPInstanceUID
    Tag(0x0008, 0x0060),  # Modality
    Tag(0x0020, 0x000D),  # StudyInstanceUID
    Tag(0x0020, 0x000E),  # SeriesInstanceUID
    Tag(0x0020, 0x0013),  # InstanceNumber
]
_LAST_TAG = max(IDENTIFYING_TAGS)
#: Compressed bytes read from a spooled deflated data set to find its identifiers.
DEFLATED_HEAD = 8 << 20


def _short(element: int, vr: bytes, value: bytes) -> bytes:
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _uid(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def file_meta_bytes(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> bytes:
    """Preamble, ``DICM`` and a File Meta Information group that is a pure function of its arguments.

    Deterministic meta means the stored file's sha256 changes only when the dataset bytes change, which is
    what idempotency on SOP Instance UID compares.
    """
    version = struct.pack("<HH2sHI", 0x0002, 0x0001, b"OB", 0, 2) + b"\x00\x01"
    name = IMPLEMENTATION_VERSION_NAME.encode("ascii")
    body = b"".join(
        [
            version,
            _short(0x0002, b"UI", _uid(sop_class_uid)),
            _short(0x0003, b"UI", _uid(sop_instance_uid)),
            _short(0x0010, b"UI", _uid(transfer_syntax_uid)),
            _short(0x0012, b"UI", _uid(IMPLEMENTATION_CLASS_UID)),
            _short(0x0013, b"SH", name + b" " if len(name) % 2 else name),
        ]
    )
    group_length = _short(0x0000, b"UL", struct.pack("<I", len(body)))
    return b"\x00" * 128 + b"DICM" + group_length + body


def _past_identifiers(tag: BaseTag, vr: str | None, length: int) -> bool:
    return bool(tag > _LAST_TAG)


def read_identifiers(dataset: bytes | BinaryIO, transfer_syntax_uid: str) -> Dataset:
    """Parse the identifying attributes from an encoded dataset (no file meta) in the given syntax.

    ``dataset`` is bytes or a file positioned at the data set (a large instance received to disk: only
    the elements up to the identifiers are read, and of a deflated one its first ``DEFLATED_HEAD`` bytes).
    Raises whatever pydicom or zlib raise on corrupt input; the caller turns that into a status.
    """
    syntax = UID(transfer_syntax_uid)
    fp: BinaryIO = BytesIO(dataset) if isinstance(dataset, bytes) else dataset
    if syntax == DeflatedExplicitVRLittleEndian:
        head = dataset if isinstance(dataset, bytes) else dataset.read(DEFLATED_HEAD)
        fp = BytesIO(zlib.decompressobj(-zlib.MAX_WBITS).decompress(head))
    # Encapsulated (compressed) syntaxes encode the dataset itself in Explicit VR Little Endian.
    implicit = syntax.is_implicit_VR if syntax.is_transfer_syntax else False
    little = syntax.is_little_endian if syntax.is_transfer_syntax else True
    return read_dataset(
        fp,
        implicit,
        little,
        stop_when=_past_identifiers,
        specific_tags=list(IDENTIFYING_TAGS),
    )
