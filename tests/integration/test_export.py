"""The export job handler end to end on a real DB (SQLite + PostgreSQL), real files and a real storage SCP."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import SecondaryCaptureImageStorage
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from structlog.testing import capture_logs
from typer.testing import CliRunner

from tests.conftest import free_port
from tests.support.fake_pacs import FakePacs, running_fake_pacs
from triaged.cli.app import app
from triaged.config import Settings, load_settings
from triaged.db import audit, queue
from triaged.db.engine import make_engine, make_session_factory
from triaged.db.models import (
    AuditEvent,
    Instance,
    Job,
    JobKind,
    JobState,
    Output,
    OutputKind,
    Result,
    ResultStatus,
    Series,
    SeriesState,
    SlicePrediction,
    Study,
)
from triaged.db.schema import upgrade
from triaged.dicom.synthetic import write_mr_series
from triaged.errors import ConfigError, DestinationDownError, DicomPeerError, DicomSendError
from triaged.export import run_export_job
from triaged.log import uid_hash
from triaged.outputs.destinations import resolve_destination
from triaged.receive.storage import InstanceStore
from triaged.resend import requeue_dead_exports, resend_series
from triaged.runtime import Runtime
from triaged.worker import Worker

WORKER = "test-worker"
# pynetdicom 3.0 never closes the socket of a refused connection (the GC does): not ours to fail on.
REFUSED_SOCKET = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <socket.socket:pytest.PytestUnraisableExceptionWarning"
)


@dataclass
class Scenario:
    runtime: Runtime
    result_id: int
    source_uids: list[str]


@pytest.fixture
def pacs() -> Iterator[FakePacs]:
    with running_fake_pacs() as fake:
        yield fake


def _seed(
    settings: Settings,
    session_factory: sessionmaker[Session],
    tmp_path: Path,
    *,
    status: ResultStatus = ResultStatus.ASSESSED,
    calling_ae_title: str = "FAKEPACS",
) -> Scenario:
    store = InstanceStore(settings.storage_dir, 0)
    yy, xx = np.mgrid[0:64, 0:64]
    slices = [((xx - 32) ** 2 + (yy - 30) ** 2 < 600) * (400.0 + 10 * i) for i in range(4)]
    paths = write_mr_series(slices, tmp_path / "src", seed=str(tmp_path))
    datasets = [pydicom.dcmread(p) for p in paths]
    with session_factory.begin() as session:
        study = Study(study_instance_uid=str(datasets[0].StudyInstanceUID))
        session.add(study)
        session.flush()
        series = Series(
            series_instance_uid=str(datasets[0].SeriesInstanceUID),
            study_id=study.id,
            modality="MR",
            state=SeriesState.DONE,
            instance_count=len(paths),
            calling_ae_title=calling_ae_title,
        )
        session.add(series)
        session.flush()
        for index, (path, ds) in enumerate(zip(paths, datasets, strict=True)):
            relative = f"instances/test/{index:04d}.dcm"
            store.write_atomic(relative, path.read_bytes())
            session.add(
                Instance(
                    sop_instance_uid=str(ds.SOPInstanceUID),
                    series_id=series.id,
                    sop_class_uid=str(ds.SOPClassUID),
                    transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                    instance_number=index + 1,
                    file_path=relative,
                    size_bytes=path.stat().st_size,
                    sha256="0" * 64,
                )
            )
        assessed = status == ResultStatus.ASSESSED
        result = Result(
            series_id=series.id,
            generation=1,
            model_name="densenet121-brainmri",
            model_version="0.1.0",
            model_sha256="ab" * 32,
            status=status,
            reason=None if assessed else "not a brain series",
            label="glioma" if assessed else None,
            probabilities={"glioma": 0.7, "meningioma": 0.1, "notumor": 0.1, "pituitary": 0.1} if assessed else {},
            urgency=0.7 if assessed else None,
            threshold=0.5 if assessed else None,
            urgent=assessed,
        )
        session.add(result)
        session.flush()
        cam = np.zeros((64, 64), dtype=np.float32)
        cam[20:40, 20:40] = 1.0
        store.write_atomic("cams/test-1.npy", _npy(cam))
        for index, ds in enumerate(datasets):
            session.add(
                SlicePrediction(
                    result_id=result.id,
                    slice_index=index,
                    sop_instance_uid=str(ds.SOPInstanceUID),
                    probabilities=[0.7, 0.1, 0.1, 0.1],
                    tumour_probability={1: 0.8, 2: 0.95}.get(index, 0.1),
                    in_brain=True,
                    is_key=assessed and index in (1, 2),
                    cam_path="cams/test-1.npy" if index == 1 else None,
                )
            )
        queue.enqueue(
            session,
            JobKind.EXPORT,
            dedupe_key=f"export:{result.id}",
            series_id=series.id,
            generation=1,
            payload={"result_id": result.id},
            max_attempts=settings.worker.export_max_attempts,
        )
        result_id = result.id
    runtime = Runtime(settings=settings, session_factory=session_factory, store=store, triage=None)
    return Scenario(runtime, result_id, [str(ds.SOPInstanceUID) for ds in datasets])


def _npy(array: np.ndarray) -> bytes:
    from io import BytesIO

    buffer = BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _claim(runtime: Runtime) -> Job:
    job = queue.claim(runtime.session_factory, worker_id=WORKER, kinds=[JobKind.EXPORT], lease_seconds=60)
    assert job is not None
    return job


def _outputs(runtime: Runtime) -> list[Output]:
    with runtime.session_factory() as session:
        return list(session.scalars(select(Output).order_by(Output.id)))


def _job_state(runtime: Runtime, job_id: int) -> Job:
    with runtime.session_factory() as session:
        job = session.get(Job, job_id)
        assert job is not None
        session.expunge(job)
        return job


def _settings(make_settings: Callable[..., Settings], port: int, **outputs: object) -> Settings:
    return make_settings(
        dicom={"peers": {"pacs": {"ae_title": "FAKEPACS", "host": "127.0.0.1", "port": port}}},
        outputs=outputs,
    )


def test_export_builds_stores_sends_and_completes(
    pacs: FakePacs, make_settings: Callable[..., Settings], session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    scenario = _seed(_settings(make_settings, pacs.port), session_factory, tmp_path)
    job = _claim(scenario.runtime)
    run_export_job(scenario.runtime, job)
    outputs = _outputs(scenario.runtime)
    assert [o.kind for o in outputs] == [OutputKind.SECONDARY_CAPTURE] * 2 + [
        OutputKind.KEY_OBJECT_SELECTION,
        OutputKind.STRUCTURED_REPORT,
    ]
    assert all(o.sent_at is not None and o.destination == "pacs" for o in outputs)
    assert pacs.sop_instance_uids() == [o.sop_instance_uid for o in outputs]
    assert set(pacs.calling_ae_titles) == {"TRIAGED"}
    for output in outputs:
        stored = pydicom.dcmread(scenario.runtime.store.path_for(output.file_path))
        assert stored.SOPInstanceUID == output.sop_instance_uid
    sc = pacs.received[0]
    assert sc.SOPClassUID == SecondaryCaptureImageStorage
    # Key images are sent most suspicious first: slice 2 (0.95) before slice 1 (0.8).
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == scenario.source_uids[2]
    assert sc.InstanceNumber == 1
    assert pacs.received[1].SourceImageSequence[0].ReferencedSOPInstanceUID == scenario.source_uids[1]
    assert _job_state(scenario.runtime, job.id).state == JobState.DONE
    (event,) = _export_audit(scenario.runtime)
    assert (event.outcome, event.actor, event.detail["destination"]) == ("sent", WORKER, "pacs")
    assert event.detail["job_id"] == job.id and event.detail["result_id"] == scenario.result_id
    assert event.detail["sop_instance_uid_hashes"] == [uid_hash(o.sop_instance_uid) for o in outputs]
    assert event.detail["objects"] == event.detail["delivered"] == len(outputs)
    raw_uids = [o.sop_instance_uid for o in outputs] + scenario.source_uids
    assert not any(uid in json.dumps(event.detail) for uid in raw_uids)


def _export_audit(runtime: Runtime) -> list[AuditEvent]:
    with runtime.session_factory() as session:
        query = select(AuditEvent).where(AuditEvent.kind == audit.EXPORT).order_by(AuditEvent.id)
        return list(session.scalars(query))


def test_an_export_the_worker_gives_up_on_is_audited_once_as_dead(
    pacs: FakePacs, make_settings: Callable[..., Settings], session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    scenario = _seed(_settings(make_settings, pacs.port), session_factory, tmp_path)
    pacs.statuses = [0x0000] + [0xA700] * 100  # the first object is delivered, then the peer refuses every one
    worker = Worker(scenario.runtime, worker_id=WORKER, stop=threading.Event(), kinds=[JobKind.EXPORT])
    states = []
    while not states or states[-1] == JobState.QUEUED:
        job = queue.claim(session_factory, worker_id=WORKER, kinds=[JobKind.EXPORT], lease_seconds=60, now=_later())
        assert job is not None
        assert _export_audit(scenario.runtime) == []  # nothing is audited while the job will still be retried
        states.append(worker.run_job(job))
    assert states[-1] == JobState.DEAD
    (event,) = _export_audit(scenario.runtime)
    assert (event.outcome, event.reason, event.detail["destination"]) == ("dead", "attempts", "pacs")
    outputs = _outputs(scenario.runtime)
    assert event.detail["sop_instance_uid_hashes"] == [uid_hash(o.sop_instance_uid) for o in outputs]
    assert (event.detail["objects"], event.detail["delivered"]) == (len(outputs), 1)


def test_an_export_whose_last_lease_ran_out_is_audited_as_dead_by_the_reaper(
    make_settings: Callable[..., Settings], session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    scenario = _seed(_settings(make_settings, free_port()), session_factory, tmp_path)
    job = _claim(scenario.runtime)  # its worker dies holding it, on its last attempt
    with session_factory.begin() as session:
        session.get_one(Job, job.id).max_attempts = job.attempts
    assert queue.reap_expired_leases(session_factory, now=_later()) == 1
    assert _job_state(scenario.runtime, job.id).state == JobState.DEAD
    (event,) = _export_audit(scenario.runtime)
    assert (event.outcome, event.reason, event.detail["job_id"]) == ("dead", "lease_expired", job.id)
    assert (event.detail["objects"], event.detail["delivered"]) == (0, 0)  # it died before building anything


def _later() -> datetime:
    """A claim time past any backoff the worker scheduled."""
    return datetime.now(UTC) + timedelta(hours=2)


def test_failed_send_resumes_with_the_same_uids_and_no_duplicates(
    pacs: FakePacs, make_settings: Callable[..., Settings], session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    scenario = _seed(_settings(make_settings, pacs.port), session_factory, tmp_path)
    pacs.statuses = [0x0000, 0xA700]  # second object: out of resources
    job = _claim(scenario.runtime)
    with pytest.raises(DicomSendError, match="0xA700") as info:
        run_export_job(scenario.runtime, job)
    state = queue.fail(scenario.runtime.session_factory, job.id, WORKER, info.value, backoff_base_seconds=0.001)
    assert state == JobState.QUEUED
    first = _outputs(scenario.runtime)
    assert [o.sent_at is not None for o in first] == [True, False, False, False]
    assert _job_state(scenario.runtime, job.id).last_error is not None
    retry = _claim(scenario.runtime)
    assert retry.id == job.id and retry.attempts == 2
    run_export_job(scenario.runtime, retry)
    second = _outputs(scenario.runtime)
    assert [o.sop_instance_uid for o in second] == [o.sop_instance_uid for o in first]
    assert all(o.sent_at is not None for o in second)
    received = pacs.sop_instance_uids()
    assert sorted(received) == sorted(o.sop_instance_uid for o in second)  # each exactly once
    assert _job_state(scenario.runtime, job.id).state == JobState.DONE


@REFUSED_SOCKET
def test_unreachable_pacs_is_retryable_and_keeps_built_outputs(
    make_settings: Callable[..., Settings], session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    settings = _settings(make_settings, free_port(), key_object_selection=False)
    settings = settings.model_copy(
        update={"dicom": settings.dicom.model_copy(update={"acse_timeout": 5, "network_timeout": 5})}
    )
    scenario = _seed(settings, session_factory, tmp_path)
    job = _claim(scenario.runtime)
    with pytest.raises(DestinationDownError) as info:
        run_export_job(scenario.runtime, job)
    assert info.value.retryable and info.value.destination == "pacs"
    assert isinstance(info.value.__cause__, DicomPeerError)
    outputs = _outputs(scenario.runtime)
    assert len(outputs) == 3 and all(o.sent_at is None for o in outputs)


def test_not_assessable_with_default_settings_builds_nothing(
    pacs: FakePacs, make_settings: Callable[..., Settings], session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    scenario = _seed(_settings(make_settings, pacs.port), session_factory, tmp_path, status=ResultStatus.NOT_ASSESSABLE)
    job = _claim(scenario.runtime)
    run_export_job(scenario.runtime, job)
    assert _outputs(scenario.runtime) == [] and pacs.received == []
    assert _job_state(scenario.runtime, job.id).state == JobState.DONE


def test_not_assessable_notice_sc_when_configured(
    pacs: FakePacs, make_settings: Callable[..., Settings], session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    settings = _settings(make_settings, pacs.port, not_assessable="sc")
    scenario = _seed(settings, session_factory, tmp_path, status=ResultStatus.NOT_ASSESSABLE)
    run_export_job(scenario.runtime, _claim(scenario.runtime))
    assert [ds.SeriesDescription for ds in pacs.received] == ["AI TRIAGE: not assessable"]


def test_superseded_result_is_not_sent(
    pacs: FakePacs, make_settings: Callable[..., Settings], session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    scenario = _seed(_settings(make_settings, pacs.port), session_factory, tmp_path)
    with session_factory.begin() as session:
        for series in session.scalars(select(Series)):
            series.generation = 2  # late instances re-opened the series after this result
    job = _claim(scenario.runtime)
    run_export_job(scenario.runtime, job)
    assert _outputs(scenario.runtime) == [] and pacs.received == []
    assert _job_state(scenario.runtime, job.id).state == JobState.DONE


def test_destination_rules(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(
        dicom={"peers": {"orthanc": {"ae_title": "ORTHANC", "port": 4242}, "other": {"ae_title": "OTHER"}}}
    )
    assert resolve_destination(settings, "ORTHANC").name == "orthanc"
    assert resolve_destination(settings, "OTHER").port == 104
    with pytest.raises(ConfigError, match="not a configured peer") as info:
        resolve_destination(settings, "STRANGER")
    assert not info.value.retryable
    fixed = make_settings(
        dicom={"peers": {"orthanc": {"ae_title": "ORTHANC", "port": 4242}}}, outputs={"destination": "orthanc"}
    )
    assert resolve_destination(fixed, "STRANGER").ae_title == "ORTHANC"
    broken = make_settings(outputs={"destination": "nowhere"})
    with pytest.raises(ConfigError, match="nowhere"):
        resolve_destination(broken, "X")


@REFUSED_SOCKET
def test_unknown_sender_fails_the_job_permanently(
    make_settings: Callable[..., Settings], session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    scenario = _seed(_settings(make_settings, free_port()), session_factory, tmp_path, calling_ae_title="STRANGER")
    job = _claim(scenario.runtime)
    with pytest.raises(ConfigError) as info:
        run_export_job(scenario.runtime, job)
    assert queue.fail(scenario.runtime.session_factory, job.id, WORKER, info.value) == JobState.FAILED


def test_resend_series_sends_again_with_the_same_uids(
    pacs: FakePacs, make_settings: Callable[..., Settings], session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    scenario = _seed(_settings(make_settings, pacs.port), session_factory, tmp_path)
    run_export_job(scenario.runtime, _claim(scenario.runtime))
    first = pacs.sop_instance_uids()
    with session_factory.begin() as session:
        series = session.scalars(select(Series)).all()
        requeued = resend_series(session, list(series), max_attempts=3)
        again = resend_series(session, list(series), max_attempts=3)  # already queued: no second job
    assert requeued[0].job_id is not None and again[0].job_id is None
    assert all(o.sent_at is None for o in _outputs(scenario.runtime))
    run_export_job(scenario.runtime, _claim(scenario.runtime))
    assert pacs.sop_instance_uids() == first + first


def test_dead_exports_are_requeued(
    pacs: FakePacs, make_settings: Callable[..., Settings], session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    scenario = _seed(_settings(make_settings, pacs.port), session_factory, tmp_path)
    pacs.statuses = [0xA700]  # the peer answers and refuses: that spends the (only) attempt
    job = _claim(scenario.runtime)
    with session_factory.begin() as session:
        session.get(Job, job.id).max_attempts = 1  # type: ignore[union-attr]
    with pytest.raises(DicomSendError) as info:
        run_export_job(scenario.runtime, job)
    assert queue.fail(session_factory, job.id, WORKER, info.value) == JobState.DEAD
    with session_factory.begin() as session:
        assert requeue_dead_exports(session) == [job.id]
    assert _job_state(scenario.runtime, job.id).state == JobState.QUEUED


def test_resend_cli(pacs: FakePacs, tmp_path: Path, sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    upgrade(engine)
    session_factory = make_session_factory(engine)
    config = tmp_path / "triaged.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n[database]\nurl = "{sqlite_url}"\n', encoding="utf-8")
    settings = load_settings(config)
    scenario = _seed(settings, session_factory, tmp_path)
    with session_factory() as session:
        series_uid = session.scalars(select(Series.series_instance_uid)).one()
        study_uid = session.scalars(select(Study.study_instance_uid)).one()
    runner = CliRunner()
    result = runner.invoke(app, ["--config", str(config), "resend", "--json", series_uid])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)[0]["result_id"] == scenario.result_id
    result = runner.invoke(app, ["--config", str(config), "resend", "--study", study_uid])
    assert result.exit_code == 0, result.output
    assert "already queued" in result.stdout and series_uid in result.stdout  # the seeded export is still queued
    result = runner.invoke(app, ["--config", str(config), "resend", "--study", "1.2.3"])
    assert result.exit_code == 1 and "no study" in result.stderr
    result = runner.invoke(app, ["--config", str(config), "resend", "1.2.3"])
    assert result.exit_code == 1 and "no series" in result.stderr
    result = runner.invoke(app, ["--config", str(config), "resend"])
    assert result.exit_code == 2 and "exactly one" in result.stderr
    result = runner.invoke(app, ["--config", str(config), "resend", "--dead"])
    assert result.exit_code == 0 and "re-queued 0 export job(s)" in result.stdout
    engine.dispose()


def test_an_unreadable_key_slice_costs_only_its_own_secondary_capture(
    pacs: FakePacs, make_settings: Callable[..., Settings], session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    scenario = _seed(_settings(make_settings, pacs.port), session_factory, tmp_path)
    with session_factory() as session:
        most_suspicious = session.scalars(
            select(Instance).where(Instance.sop_instance_uid == scenario.source_uids[2])
        ).one()
    scenario.runtime.store.path_for(most_suspicious.file_path).unlink()  # lost from the store, row still there
    with capture_logs() as logs:
        run_export_job(scenario.runtime, _claim(scenario.runtime))
    outputs = _outputs(scenario.runtime)
    assert [o.kind for o in outputs] == [
        OutputKind.SECONDARY_CAPTURE,
        OutputKind.KEY_OBJECT_SELECTION,
        OutputKind.STRUCTURED_REPORT,
    ]
    assert pacs.received[0].SourceImageSequence[0].ReferencedSOPInstanceUID == scenario.source_uids[1]
    assert sorted(pacs.sop_instance_uids()) == sorted(o.sop_instance_uid for o in outputs)
    events = [e["event"] for e in logs]
    assert events.count("output_source_unreadable") == 1 and events.count("output_evidence_unreadable") == 1
