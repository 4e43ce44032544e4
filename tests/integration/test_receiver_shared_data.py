"""Every parseable real file of ../shared/data/dicom is received and stored byte-identical, with the right rows.

The stored file's File Meta Information is written by the receiver (documented: MediaStorage UIDs from the
C-STORE request, the negotiated transfer syntax, triaged's implementation UID); everything after it must
equal the source file's dataset bytes exactly.
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from tests.support.receiver import (
    dataset_bytes,
    dcmtk,
    receiver_settings,
    run_dcmtk,
    running_receiver,
    send,
)
from triaged.db.models import Instance, Series, Study


def _dataset_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)


def _index(shared_data_dir: Path) -> list[dict[str, str]]:
    with (shared_data_dir / "dicom" / "index.csv").open(newline="") as handle:
        return [row for row in csv.DictReader(handle) if row["parse_ok"] == "yes"]


def test_every_parseable_shared_file_is_stored_byte_identical(shared_data_dir, make_settings, session_factory):
    rows = _index(shared_data_dir)
    assert len(rows) >= 200
    paths = [shared_data_dir / "dicom" / row["path"] for row in rows]
    settings = receiver_settings(make_settings)
    with running_receiver(settings, session_factory) as receiver:
        results = send(receiver, paths)
    by_path = {result.path: result for result in results}
    with session_factory() as session:
        instances = {i.sop_instance_uid: i for i in session.scalars(select(Instance))}
        series = {s.id: s for s in session.scalars(select(Series))}
        studies = {s.id: s for s in session.scalars(select(Study))}
    # A few real files share a SOP Instance UID with different bytes (the 12-bit variants): newest wins.
    last_sent = {_dataset_uid(p): p for p in paths}
    stored = 0
    for row, path in zip(rows, paths, strict=True):
        result = by_path[path]
        assert result.status == 0x0000, (row["path"], result)
        # The dataset's SOP Instance UID is the identity (a few real files' meta disagrees with it).
        stored += 1
        if last_sent[_dataset_uid(path)] != path:
            continue
        instance = instances[_dataset_uid(path)]
        stored_path = settings.storage_dir / instance.file_path
        assert dataset_bytes(stored_path) == dataset_bytes(path), row["path"]
        assert hashlib.sha256(stored_path.read_bytes()).hexdigest() == instance.sha256
        assert instance.size_bytes == stored_path.stat().st_size
        # The truncated J2K file has an empty SOPClassUID column (pydicom finds no pixel data): the receiver
        # does not decode, so it is stored like any other parseable file.
        assert instance.sop_class_uid == (row["SOPClassUID"] or instance.sop_class_uid)
        assert instance.transfer_syntax_uid == row["TransferSyntaxUID"]
        if row["InstanceNumber"]:
            assert instance.instance_number == int(row["InstanceNumber"])
        if not row["SOPClassUID"]:
            continue  # index columns are empty for that file; its bytes were checked above
        assert series[instance.series_id].series_instance_uid == row["SeriesInstanceUID"]
        assert series[instance.series_id].modality == row["Modality"]
        assert studies[series[instance.series_id].study_id].study_instance_uid == row["StudyInstanceUID"]
    assert stored == len(rows)
    assert len(instances) == len(last_sent)
    assert not list((settings.storage_dir / ".tmp").iterdir())


# storescu proposal option for each transfer syntax it can propose (.57 has none; pynetdicom covers it above).
_STORESCU_OPTION = {
    "1.2.840.10008.1.2": "-xi",
    "1.2.840.10008.1.2.1": "-xe",
    "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.5": "-xr",
}


@pytest.mark.dcmtk
def test_storescu_sends_each_transfer_syntax_unchanged(shared_data_dir, make_settings, session_factory):
    storescu = dcmtk("storescu")
    rows = [r for r in _index(shared_data_dir) if r["SOPClassUID"]]
    chosen: dict[tuple[str, str], dict[str, str]] = {}
    uids: set[str] = set()
    for row in rows:
        key = (row["SOPClassUID"], row["TransferSyntaxUID"])
        uid = _dataset_uid(shared_data_dir / "dicom" / row["path"])
        if row["TransferSyntaxUID"] in _STORESCU_OPTION and key not in chosen and uid not in uids:
            chosen[key] = row
            uids.add(uid)
    assert len(chosen) >= 9
    settings = receiver_settings(make_settings)
    with running_receiver(settings, session_factory) as receiver:
        for (_, syntax), row in sorted(chosen.items()):
            path = shared_data_dir / "dicom" / row["path"]
            proc = run_dcmtk(
                [
                    storescu,
                    "-aet",
                    "DCMTK",
                    "-aec",
                    "TRIAGED",
                    _STORESCU_OPTION[syntax],
                    "-R",
                    "127.0.0.1",
                    str(receiver.port),
                    str(path),
                ]
            )
            assert proc.returncode == 0, (row["path"], proc.stderr)
    with session_factory() as session:
        instances = {i.sop_instance_uid: i for i in session.scalars(select(Instance))}
    differing: list[str] = []
    for (_, syntax), row in chosen.items():
        path = shared_data_dir / "dicom" / row["path"]
        instance = instances[_dataset_uid(path)]
        assert instance.transfer_syntax_uid == syntax
        stored_path = settings.storage_dir / instance.file_path
        if dataset_bytes(stored_path) != dataset_bytes(path):
            # storescu re-encodes what it parsed (e.g. sequence lengths, padding): bytes can differ from the
            # source file, but the receiver stored exactly what storescu sent, so every element is equal.
            differing.append(row["path"])
            assert pydicom.dcmread(stored_path) == pydicom.dcmread(path), row["path"]
    assert len(differing) < len(chosen), "storescu should send most files byte-identical"
