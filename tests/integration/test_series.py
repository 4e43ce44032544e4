"""Series completion: fires once per series and generation, only after release + quiet period."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pydicom
import pytest
from pydicom.uid import SecondaryCaptureImageStorage
from pynetdicom import AE
from sqlalchemy import select

from tests.support.receiver import (
    receiver_settings,
    running_receiver,
    send,
    synthetic_series,
    wait_for,
)
from triaged.db.models import Association, Job, JobKind, JobState, Series, SeriesState
from triaged.outputs.send import read_dicom_file
from triaged.receive.series import sweep_complete_series


def _later(seconds: float) -> datetime:
    return datetime.now(UTC) + timedelta(seconds=seconds)


def _series(session_factory) -> list[Series]:
    with session_factory() as session:
        return list(session.scalars(select(Series).order_by(Series.id)))


def _jobs(session_factory) -> list[Job]:
    with session_factory() as session:
        return list(session.scalars(select(Job).order_by(Job.id)))


def _closed(session_factory) -> bool:
    with session_factory() as session:
        return all(a.closed_at is not None for a in session.scalars(select(Association)))


def test_completion_fires_once_after_release_and_quiet(tmp_path, make_settings, session_factory):
    settings = receiver_settings(make_settings, series={"quiet_seconds": 0.5})
    with running_receiver(settings, session_factory) as receiver:
        assert all(r.ok for r in send(receiver, synthetic_series(tmp_path / "a", 3, seed=1)))
        assert all(r.ok for r in send(receiver, synthetic_series(tmp_path / "b", 2, seed=2)))
        wait_for(lambda: _closed(session_factory))
        # Quiet period not over yet. The clock is pinned inside it: on a loaded machine writing and sending
        # series b and waiting for the release can take longer than 0.5 s of real time.
        first_quiet_from = min(s.last_received_at for s in _series(session_factory))
        inside_quiet = first_quiet_from + timedelta(seconds=settings.series.quiet_seconds * 0.8)
        assert sweep_complete_series(session_factory, settings, now=inside_quiet) == []
        fired: list[int] = []

        def two_fired() -> bool:
            fired.extend(sweep_complete_series(session_factory, settings))
            return len(fired) == 2

        wait_for(two_fired)
        assert sweep_complete_series(session_factory, settings, now=_later(60)) == []
    series = _series(session_factory)
    assert sorted(fired) == [s.id for s in series]
    assert all(s.state == SeriesState.QUEUED and s.completed_at is not None for s in series)
    jobs = _jobs(session_factory)
    assert [(j.kind, j.state, j.series_id, j.generation, j.dedupe_key) for j in jobs] == [
        (JobKind.INFER, JobState.QUEUED, s.id, 1, f"infer:{s.id}:1") for s in series
    ]
    assert all(j.max_attempts == settings.worker.max_attempts for j in jobs)


def test_not_complete_while_the_sending_association_is_open(tmp_path, make_settings, session_factory):
    settings = receiver_settings(make_settings, series={"quiet_seconds": 0.5})
    paths = synthetic_series(tmp_path / "a", 2)
    with running_receiver(settings, session_factory) as receiver:
        ae = AE(ae_title="SLOWPACS")
        meta = read_dicom_file(paths[0])
        ae.add_requested_context(meta.sop_class_uid, meta.transfer_syntax_uid)
        assoc = ae.associate("127.0.0.1", receiver.port, ae_title="TRIAGED")
        assert assoc.is_established
        for path in paths:
            assert assoc.send_c_store(path).Status == 0
        assert sweep_complete_series(session_factory, settings, now=_later(3600)) == []
        assoc.release()
        wait_for(lambda: _closed(session_factory))
        assert len(sweep_complete_series(session_factory, settings, now=_later(1))) == 1


def test_late_instance_reopens_with_next_generation(tmp_path, make_settings, session_factory):
    settings = receiver_settings(make_settings, series={"quiet_seconds": 0.5})
    paths = synthetic_series(tmp_path / "a", 3, seed=9)
    with running_receiver(settings, session_factory) as receiver:
        assert all(r.ok for r in send(receiver, paths[:2]))
        wait_for(lambda: _closed(session_factory))
        (series_id,) = sweep_complete_series(session_factory, settings, now=_later(1))
        assert all(r.ok for r in send(receiver, paths[2:]))
        wait_for(lambda: _closed(session_factory))
        (series,) = _series(session_factory)
        assert (series.state, series.generation, series.completed_at) == (SeriesState.RECEIVING, 2, None)
        assert sweep_complete_series(session_factory, settings, now=_later(1)) == [series_id]
    (series,) = _series(session_factory)
    assert (series.state, series.generation, series.instance_count) == (SeriesState.QUEUED, 2, 3)
    assert [j.dedupe_key for j in _jobs(session_factory)] == [f"infer:{series_id}:1", f"infer:{series_id}:2"]


def test_non_mr_series_is_skipped_with_a_reason(tmp_path, make_settings, session_factory):
    settings = receiver_settings(
        make_settings,
        series={"quiet_seconds": 0.5},
        dicom={"extra_storage_sop_classes": [SecondaryCaptureImageStorage]},
    )
    ct = synthetic_series(tmp_path / "ct", 2, seed=3, modality="CT")
    sc = synthetic_series(tmp_path / "sc", 1, seed=4)
    ds = pydicom.dcmread(sc[0])
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.save_as(sc[0])
    with running_receiver(settings, session_factory) as receiver:
        assert all(r.ok for r in send(receiver, ct + sc))
        wait_for(lambda: _closed(session_factory))
        assert len(sweep_complete_series(session_factory, settings, now=_later(1))) == 2
    reasons = {s.modality: s.skip_reason for s in _series(session_factory)}
    assert all(s.state == SeriesState.SKIPPED for s in _series(session_factory))
    assert reasons["CT"] == "modality CT is not MR"
    assert "no MR image storage instances" in (reasons["MR"] or "")
    assert SecondaryCaptureImageStorage in (reasons["MR"] or "")
    assert _jobs(session_factory) == []


def test_per_peer_quiet_override(tmp_path, make_settings, session_factory):
    settings = receiver_settings(
        make_settings,
        series={"quiet_seconds": 0.5},
        dicom={"peers": {"slow": {"ae_title": "SLOWPACS", "quiet_seconds": 30}}},
    )
    with running_receiver(settings, session_factory) as receiver:
        assert all(r.ok for r in send(receiver, synthetic_series(tmp_path / "a", 1, seed=1), calling_ae="SLOWPACS"))
        assert all(r.ok for r in send(receiver, synthetic_series(tmp_path / "b", 1, seed=2), calling_ae="FASTPACS"))
        wait_for(lambda: _closed(session_factory))
    fast, slow = sorted(_series(session_factory), key=lambda s: s.calling_ae_title)
    assert sweep_complete_series(session_factory, settings, now=_later(5)) == [fast.id]
    assert sweep_complete_series(session_factory, settings, now=_later(31)) == [slow.id]


@pytest.mark.parametrize("sweepers", [4])
def test_concurrent_sweeps_fire_each_series_once(tmp_path, make_settings, session_factory, sweepers):
    settings = receiver_settings(make_settings, series={"quiet_seconds": 0.5})
    with running_receiver(settings, session_factory) as receiver:
        for seed in range(3):
            assert all(r.ok for r in send(receiver, synthetic_series(tmp_path / str(seed), 1, seed=seed)))
        wait_for(lambda: _closed(session_factory))
    results: list[list[int]] = []
    barrier = threading.Barrier(sweepers)
    now = _later(2)

    def sweep() -> None:
        barrier.wait()
        results.append(sweep_complete_series(session_factory, settings, now=now))

    threads = [threading.Thread(target=sweep) for _ in range(sweepers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    fired = sorted(i for r in results for i in r)
    assert fired == sorted(s.id for s in _series(session_factory))
    assert len(_jobs(session_factory)) == 3
