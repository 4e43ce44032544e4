"""The real receiver on loopback with real peers: storage, rows, idempotency, statuses, rejections."""

from __future__ import annotations

import hashlib
import re
import socket
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import (
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    SecondaryCaptureImageStorage,
)
from pynetdicom import AE
from sqlalchemy import select, update
from structlog.testing import capture_logs

from tests.support.connections import associate, close, rejection
from tests.support.dicom_files import SYNTHETIC_SYNTAXES
from tests.support.receiver import (
    dataset_bytes,
    dcmtk,
    instance_rows,
    receiver_settings,
    run_dcmtk,
    running_receiver,
    send,
    synthetic_series,
    wait_for,
)
from triaged import metrics
from triaged.db.models import Association, Series, SeriesAssociation, SeriesState, Study
from triaged.errors import DicomPeerError
from triaged.outputs.send import echo
from triaged.receive import status


def _storage_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def test_echo_with_pynetdicom_and_echoscu(make_settings, session_factory):
    settings = receiver_settings(make_settings)
    with running_receiver(settings, session_factory) as receiver:
        assert echo("127.0.0.1", receiver.port, called_ae_title="TRIAGED", calling_ae_title="ECHOSCU") == 0
        proc = run_dcmtk([dcmtk("echoscu"), "-aet", "DCMTK", "-aec", "TRIAGED", "127.0.0.1", str(receiver.port)])
        assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(
    "syntax",
    SYNTHETIC_SYNTAXES,
)
def test_series_is_stored_byte_identical_with_rows(tmp_path, make_settings, session_factory, syntax):
    paths = synthetic_series(tmp_path / "src", 4, transfer_syntax_uid=syntax)
    settings = receiver_settings(make_settings)
    with running_receiver(settings, session_factory) as receiver:
        results = send(receiver, paths)
        assert [r.status for r in results] == [0, 0, 0, 0]
        wait_for(lambda: _all_closed(session_factory))
    rows = instance_rows(session_factory)
    assert len(rows) == 4
    for path, row in zip(paths, sorted(rows, key=lambda r: r.instance_number or 0), strict=True):
        stored = settings.storage_dir / row.file_path
        assert dataset_bytes(stored) == dataset_bytes(path)
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == row.sha256
        meta = pydicom.dcmread(stored).file_meta
        assert meta.TransferSyntaxUID == syntax
        assert meta.MediaStorageSOPInstanceUID == row.sop_instance_uid
        assert row.transfer_syntax_uid == syntax
        assert row.sop_class_uid == MRImageStorage
        assert row.generation == 1
        assert row.association_id is not None
        assert row.sop_instance_uid not in row.file_path
    source = pydicom.dcmread(paths[0])
    with session_factory() as session:
        series = session.scalars(select(Series)).one()
        assert series.series_instance_uid == source.SeriesInstanceUID
        assert series.instance_count == 4
        assert series.modality == "MR"
        assert series.state == SeriesState.RECEIVING
        assert series.calling_ae_title == "TESTSCU"
        assert session.scalars(select(Study)).one().study_instance_uid == source.StudyInstanceUID
        association = session.scalars(select(Association)).one()
        assert association.calling_ae_title == "TESTSCU"
        assert association.closed_at is not None
        link = session.scalars(select(SeriesAssociation)).one()
        assert (link.series_id, link.association_id) == (series.id, association.id)
    assert not _storage_files(settings.storage_dir / ".tmp")


def _all_closed(session_factory) -> bool:
    with session_factory() as session:
        return all(a.closed_at is not None for a in session.scalars(select(Association)))


def test_same_instance_twice_gives_one_row(tmp_path, make_settings, session_factory):
    paths = synthetic_series(tmp_path / "src", 2)
    settings = receiver_settings(make_settings)
    with running_receiver(settings, session_factory) as receiver:
        assert [r.status for r in send(receiver, paths)] == [0, 0]
        assert [r.status for r in send(receiver, paths[:1])] == [0]
        assert [r.status for r in send(receiver, paths)] == [0, 0]
    rows = instance_rows(session_factory)
    assert len(rows) == 2
    assert len([p for p in _storage_files(settings.storage_dir) if p.suffix == ".dcm"]) == 2
    with session_factory() as session:
        series = session.scalars(select(Series)).one()
        assert series.instance_count == 2
        assert series.generation == 1


def test_changed_bytes_newest_wins_and_reopens_processed_series(tmp_path, make_settings, session_factory):
    first = synthetic_series(tmp_path / "a", 2, seed=5)
    changed = synthetic_series(tmp_path / "b", 2, seed=5, series_description="T1 AX POST GD REVISED")
    assert pydicom.dcmread(first[0]).SOPInstanceUID == pydicom.dcmread(changed[0]).SOPInstanceUID
    settings = receiver_settings(make_settings)
    with running_receiver(settings, session_factory) as receiver:
        assert [r.status for r in send(receiver, first)] == [0, 0]
        with session_factory.begin() as session:
            session.execute(update(Series).values(state=SeriesState.DONE))
        assert [r.status for r in send(receiver, changed[:1])] == [0]
    rows = {r.sop_instance_uid: r for r in instance_rows(session_factory)}
    assert len(rows) == 2
    replaced = rows[pydicom.dcmread(changed[0]).SOPInstanceUID]
    assert dataset_bytes(settings.storage_dir / replaced.file_path) == dataset_bytes(changed[0])
    assert replaced.generation == 2
    with session_factory() as session:
        series = session.scalars(select(Series)).one()
        assert (series.state, series.generation, series.instance_count) == (SeriesState.RECEIVING, 2, 2)
        assert series.completed_at is None


def test_unknown_calling_ae_is_rejected_at_association(tmp_path, make_settings, session_factory):
    settings = receiver_settings(
        make_settings,
        dicom={"accept_unknown_peers": False, "peers": {"pacs": {"ae_title": "KNOWNPACS", "port": 104}}},
    )
    paths = synthetic_series(tmp_path / "src", 1)
    with running_receiver(settings, session_factory) as receiver:
        with capture_logs() as logs, pytest.raises(DicomPeerError, match="rejected"):
            send(receiver, paths, calling_ae="STRANGER")
        wait_for(lambda: any(e["event"] == "association_rejected" for e in logs))
        assert any(e.get("calling_ae") == "STRANGER" for e in logs if e["event"] == "association_rejected")
        proc = run_dcmtk([dcmtk("echoscu"), "-aet", "STRANGER", "-aec", "TRIAGED", "127.0.0.1", str(receiver.port)])
        assert proc.returncode != 0
        # dcmtk writes "Recognized", or "recognised" (3.6.7, on the CI machine of 2026-12-01)
        assert re.search(r"calling ae title not recogni[sz]ed", proc.stderr + proc.stdout, re.IGNORECASE)
        assert [r.status for r in send(receiver, paths, calling_ae="KNOWNPACS")] == [0]
    assert len(instance_rows(session_factory)) == 1


def test_disk_threshold_answers_a700_and_leaves_nothing(tmp_path, make_settings, session_factory):
    settings = receiver_settings(make_settings, storage={"min_free_bytes": 1 << 60})
    paths = synthetic_series(tmp_path / "src", 2)
    with running_receiver(settings, session_factory) as receiver:
        results = send(receiver, paths)
    assert [r.status for r in results] == [status.OUT_OF_RESOURCES] * 2
    assert instance_rows(session_factory) == []
    assert _storage_files(settings.storage_dir) == []


def _rewrite(path: Path, out: Path, **changes: str) -> Path:
    ds = pydicom.dcmread(path)
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    ds.save_as(out)
    return out


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI:UserWarning")
def test_traversal_uid_never_touches_filesystem(tmp_path, make_settings, session_factory):
    source = synthetic_series(tmp_path / "src", 1)[0]
    bad = _rewrite(source, tmp_path / "bad.dcm", SOPInstanceUID="../../etc")
    bad_series = _rewrite(source, tmp_path / "bad2.dcm", SeriesInstanceUID="1.2.3/../../x")
    settings = receiver_settings(make_settings)
    with running_receiver(settings, session_factory) as receiver:
        results = send(receiver, [bad, bad_series])
    assert [r.status for r in results] == [status.CANNOT_UNDERSTAND_INVALID_UID] * 2
    assert instance_rows(session_factory) == []
    assert _storage_files(settings.storage_dir) == []


def test_sop_class_mismatch_answers_a900(tmp_path, make_settings, session_factory):
    source = synthetic_series(tmp_path / "src", 1)[0]
    ds = pydicom.dcmread(source)
    ds.SOPClassUID = EnhancedMRImageStorage  # dataset says Enhanced MR, file meta (and request) say MR
    ds.save_as(tmp_path / "mismatch.dcm", enforce_file_format=False)
    settings = receiver_settings(make_settings)
    with running_receiver(settings, session_factory) as receiver:
        results = send(receiver, [tmp_path / "mismatch.dcm"])
    assert [r.status for r in results] == [status.DATASET_DOES_NOT_MATCH_SOP_CLASS]
    assert instance_rows(session_factory) == []


def test_unparseable_dataset_answers_c000(tmp_path, make_settings, session_factory):
    source = synthetic_series(tmp_path / "src", 1)[0]
    data = source.read_bytes()
    offset = len(data) - len(dataset_bytes(source))
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(data[:offset] + b"\x08\x00\x18\x00UI\xff\x7f" + b"1" * 40)
    settings = receiver_settings(make_settings)
    with running_receiver(settings, session_factory) as receiver:
        results = send(receiver, [garbage])
    assert results[0].status is not None and 0xC000 <= results[0].status <= 0xCFFF
    assert instance_rows(session_factory) == []
    assert _storage_files(settings.storage_dir) == []


def test_extra_storage_sop_class_is_configurable(tmp_path, make_settings, session_factory):
    source = synthetic_series(tmp_path / "src", 1)[0]
    sc = _rewrite(source, tmp_path / "sc.dcm", SOPClassUID=SecondaryCaptureImageStorage)
    ds = pydicom.dcmread(sc)
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.save_as(sc)
    plain = receiver_settings(make_settings)
    with running_receiver(plain, session_factory) as receiver, pytest.raises(DicomPeerError, match="contexts"):
        send(receiver, [sc])
    extra = receiver_settings(make_settings, dicom={"extra_storage_sop_classes": [SecondaryCaptureImageStorage]})
    with running_receiver(extra, session_factory) as receiver:
        assert send(receiver, [sc])[0].status == 0
    assert [r.sop_class_uid for r in instance_rows(session_factory)] == [SecondaryCaptureImageStorage]


def test_max_associations_rejects_the_one_too_many(make_settings, session_factory):
    settings = receiver_settings(make_settings, dicom={"max_associations": 1})
    with running_receiver(settings, session_factory) as receiver:
        ae = AE(ae_title="HOLDER")
        ae.add_requested_context("1.2.840.10008.1.1")
        holder = ae.associate("127.0.0.1", receiver.port, ae_title="TRIAGED")
        assert holder.is_established
        (accepted,) = receiver._server.active_associations  # type: ignore[union-attr]
        assert accepted.dul.socket is not None and accepted.dul.socket.socket is not None
        sock = accepted.dul.socket.socket
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1  # Nagle off on accepted sockets
        try:
            second_ae, second = associate(receiver.port, calling_ae="SECOND")
            # A-ASSOCIATE-RJ: rejected transient, service provider (presentation), local limit exceeded.
            assert rejection(second) == (0x02, 0x03, 0x02)
            close(second_ae, second)
        finally:
            holder.release()
        wait_for(lambda: not receiver._server.active_associations)  # type: ignore[union-attr]
        assert echo("127.0.0.1", receiver.port, called_ae_title="TRIAGED", calling_ae_title="THIRD") == 0


def test_aborted_association_is_closed_in_the_table(tmp_path, make_settings, session_factory):
    settings = receiver_settings(make_settings)
    path = synthetic_series(tmp_path / "src", 1)[0]
    with running_receiver(settings, session_factory) as receiver:
        ae = AE(ae_title="ABORTER")
        ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", receiver.port, ae_title="TRIAGED")
        assert assoc.send_c_store(path).Status == 0
        assoc.abort()
        wait_for(lambda: _all_closed(session_factory))
    with session_factory() as session:
        (association,) = session.scalars(select(Association))
        assert association.calling_ae_title == "ABORTER"
        assert association.closed_at is not None and association.closed_at >= association.opened_at


def test_metrics_count_received_and_rejected(tmp_path, make_settings, session_factory):
    received = metrics.INSTANCES_RECEIVED._value.get()
    rejected = metrics.INSTANCES_REJECTED.labels(reason="out_of_resources")._value.get()
    paths = synthetic_series(tmp_path / "src", 2)
    with running_receiver(receiver_settings(make_settings), session_factory) as receiver:
        send(receiver, paths)
    with running_receiver(
        receiver_settings(make_settings, storage={"min_free_bytes": 1 << 60}), session_factory
    ) as receiver:
        send(receiver, synthetic_series(tmp_path / "other", 1, seed=9))
    assert metrics.INSTANCES_RECEIVED._value.get() == received + 2
    assert metrics.INSTANCES_REJECTED.labels(reason="out_of_resources")._value.get() == rejected + 1
