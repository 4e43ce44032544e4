"""Destinations as state: a down peer costs no attempts, is probed, and its exports flow in order when it returns.

Real parts only: the export handler and the worker against a real database (SQLite and PostgreSQL), a real
pynetdicom storage SCP as the PACS, and a TCP proxy in front of it that the test switches down, hung or up
instantly. Nothing here waits for time to pass: the clock is passed in, and connections are counted.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from structlog.testing import capture_logs

from tests.integration.test_export import REFUSED_SOCKET, WORKER, _job_state, _outputs, _seed
from tests.support.fake_pacs import FakePacs, running_fake_pacs
from tests.support.tcp_proxy import TcpProxy, running_proxy
from triaged import metrics
from triaged.config import Settings
from triaged.db import destinations, queue, repo
from triaged.db.models import (
    URGENT_EXPORT_PRIORITY,
    DestinationState,
    DestinationStatus,
    Instance,
    Job,
    JobKind,
    JobState,
    Series,
    SeriesState,
    utcnow,
)
from triaged.outputs.destinations import expire_old_exports, probe_due_destinations, refresh_destination_gauges
from triaged.runtime import Runtime
from triaged.worker import Worker

pytestmark = [REFUSED_SOCKET]


@pytest.fixture
def pacs() -> Iterator[FakePacs]:
    with running_fake_pacs() as fake:
        yield fake


@pytest.fixture
def proxy(pacs: FakePacs) -> Iterator[TcpProxy]:
    with running_proxy("127.0.0.1", pacs.port) as running:
        yield running


def _settings(make_settings: Callable[..., Settings], port: int, **outputs: object) -> Settings:
    return make_settings(
        dicom={
            "peers": {"pacs": {"ae_title": "FAKEPACS", "host": "127.0.0.1", "port": port}},
            "acse_timeout": 2,
            "dimse_timeout": 2,
            "network_timeout": 2,
        },
        worker={"export_max_attempts": 2},
        outputs={"probe_base_seconds": 1, "probe_max_seconds": 4, "probe_timeout_seconds": 2, **outputs},
    )


def _run_one(runtime: Runtime) -> tuple[Job | None, JobState | None]:
    """Claim the next export job as the daemon's worker would and run it to its next state."""
    job = queue.claim(runtime.session_factory, worker_id=WORKER, kinds=[JobKind.EXPORT], lease_seconds=60)
    if job is None:
        return None, None
    worker = Worker(runtime, worker_id=WORKER, stop=threading.Event(), kinds=[JobKind.EXPORT])
    return job, worker.run_job(job)


def _destination(runtime: Runtime, name: str = "pacs") -> DestinationStatus:
    with runtime.session_factory() as session:
        row = session.get(DestinationStatus, name)
        assert row is not None
        session.expunge(row)
        return row


def test_down_destination_waits_without_spending_attempts_and_flows_once_up(
    pacs: FakePacs,
    proxy: TcpProxy,
    make_settings: Callable[..., Settings],
    session_factory: sessionmaker[Session],
    tmp_path: Path,
) -> None:
    settings = _settings(make_settings, proxy.port)
    scenario = _seed(settings, session_factory, tmp_path)
    runtime = scenario.runtime
    proxy.down()
    with capture_logs() as logs:
        job, state = _run_one(runtime)
    assert job is not None and state == JobState.QUEUED
    waiting = _job_state(runtime, job.id)
    assert (waiting.state, waiting.attempts, waiting.destination) == (JobState.QUEUED, 0, "pacs")
    assert "DestinationDownError" in (waiting.last_error or "")
    assert [e["event"] for e in logs].count("destination_down") == 1
    assert _destination(runtime).state == DestinationState.DOWN
    assert len(_outputs(runtime)) == 4 and all(o.sent_at is None for o in _outputs(runtime))
    # While down the job is not claimable, however long the outage: far more probes than the old attempt budget.
    now = utcnow()
    for probe in range(1, 3 * settings.worker.export_max_attempts + 1):
        now += timedelta(hours=1)
        assert probe_due_destinations(session_factory, settings, now) == []
        assert _destination(runtime).probes == probe
        assert queue.claim(session_factory, worker_id=WORKER, kinds=[JobKind.EXPORT], lease_seconds=60, now=now) is None
    assert proxy.refused >= 1 + 3 * settings.worker.export_max_attempts
    assert _job_state(runtime, job.id).attempts == 0
    # Probes back off: the next one is not due a moment after the last.
    with session_factory() as session:
        assert destinations.due_for_probe(session, now + timedelta(seconds=0.5)) == []
    proxy.up()
    with capture_logs() as logs:
        assert probe_due_destinations(session_factory, settings, now + timedelta(hours=1)) == ["pacs"]
    assert [e["event"] for e in logs] == ["destination_up"]
    _, state = _run_one(runtime)
    assert state == JobState.DONE
    done = _job_state(runtime, job.id)
    assert (done.state, done.attempts) == (JobState.DONE, 1)
    assert sorted(pacs.sop_instance_uids()) == sorted(o.sop_instance_uid for o in _outputs(runtime))


def test_a_hung_peer_is_down_within_bounded_timeouts(
    proxy: TcpProxy, make_settings: Callable[..., Settings], session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    settings = _settings(make_settings, proxy.port)
    scenario = _seed(settings, session_factory, tmp_path)
    proxy.hang()  # accepts TCP, never answers the A-ASSOCIATE-RQ
    job, state = _run_one(scenario.runtime)
    assert job is not None and state == JobState.QUEUED
    assert proxy.hung >= 1
    assert _job_state(scenario.runtime, job.id).attempts == 0
    assert _destination(scenario.runtime).state == DestinationState.DOWN
    # A probe of the hung peer gives up after its own timeout too, and counts.
    assert probe_due_destinations(session_factory, settings, utcnow() + timedelta(hours=1)) == []
    assert _destination(scenario.runtime).probes == 1 and proxy.hung >= 2


def test_a_refusing_peer_spends_attempts_and_stays_up(
    pacs: FakePacs, make_settings: Callable[..., Settings], session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    settings = _settings(make_settings, pacs.port)
    scenario = _seed(settings, session_factory, tmp_path)
    pacs.statuses = [0xA700] * 10  # it answers, and refuses the objects
    with capture_logs() as logs:
        for _ in range(settings.worker.export_max_attempts):
            with session_factory.begin() as session:  # skip the backoff
                session.execute(Job.__table__.update().values(run_after=utcnow() - timedelta(seconds=1)))
            _run_one(scenario.runtime)
    job = _job_state(scenario.runtime, 1)
    assert (job.state, job.attempts) == (JobState.DEAD, settings.worker.export_max_attempts)
    assert "0xA700" in (job.last_error or "")
    assert _destination(scenario.runtime).state == DestinationState.UP
    dead = [e for e in logs if e["event"] == "export_dead"]
    assert len(dead) == 1 and dead[0]["reason"] == "attempts"


def _add_export(session: Session, key: str, *, priority: int, created_minutes_ago: int, destination: str) -> int:
    job = queue.enqueue(session, JobKind.EXPORT, dedupe_key=key, priority=priority, payload={"result_id": 0})
    assert job is not None
    job.destination = destination
    job.created_at = job.run_after = utcnow() - timedelta(minutes=created_minutes_ago)
    session.flush()
    return job.id


def test_pending_exports_flow_urgent_first_then_oldest_first(session_factory: sessionmaker[Session]) -> None:
    with session_factory.begin() as session:
        destinations.mark_down(session, "pacs", "refused", first_probe_after=timedelta(seconds=1))
        old = _add_export(session, "old", priority=0, created_minutes_ago=30, destination="pacs")
        newer_urgent = _add_export(
            session, "u2", priority=URGENT_EXPORT_PRIORITY, created_minutes_ago=5, destination="pacs"
        )
        older_urgent = _add_export(
            session, "u1", priority=URGENT_EXPORT_PRIORITY, created_minutes_ago=10, destination="pacs"
        )
        new = _add_export(session, "new", priority=0, created_minutes_ago=1, destination="pacs")
        elsewhere = _add_export(session, "other", priority=0, created_minutes_ago=20, destination="other")
    claim = lambda: queue.claim(session_factory, worker_id=WORKER, kinds=[JobKind.EXPORT], lease_seconds=60)  # noqa: E731
    first = claim()
    assert first is not None and first.id == elsewhere  # another destination is not held up
    assert claim() is None
    refresh_destination_gauges(session_factory)
    assert metrics.REGISTRY.get_sample_value("triaged_destination_up", {"destination": "pacs"}) == 0
    assert metrics.REGISTRY.get_sample_value("triaged_outputs_pending", {"destination": "pacs"}) == 4
    age = metrics.REGISTRY.get_sample_value("triaged_oldest_pending_urgent_output_age_seconds", {"destination": "pacs"})
    assert age is not None and 9 * 60 < age < 60 * 60
    with session_factory.begin() as session:
        assert destinations.mark_up(session, "pacs") is not None
    order = [job.id for job in iter(claim, None)]
    assert order == [older_urgent, newer_urgent, old, new]


def test_exports_older_than_max_age_die_loudly_and_resend_revives_them(
    make_settings: Callable[..., Settings], session_factory: sessionmaker[Session]
) -> None:
    settings = make_settings(outputs={"max_age_hours": 72})
    with session_factory.begin() as session:
        destinations.mark_down(session, "pacs", "refused", first_probe_after=timedelta(seconds=1))
        job_id = _add_export(session, "stale", priority=0, created_minutes_ago=60, destination="pacs")
    assert expire_old_exports(session_factory, settings, utcnow() + timedelta(hours=70)) == 0  # 71 h old
    before = metrics.REGISTRY.get_sample_value("triaged_exports_dead_total", {"reason": "max_age"}) or 0.0
    with capture_logs() as logs:
        assert expire_old_exports(session_factory, settings, utcnow() + timedelta(hours=72)) == 1
    # loudly: one export_dead event, and its audit record (kind export, outcome expired) beside it
    assert [(e["event"], e["reason"]) for e in logs if e["event"] != "audit_event"] == [("export_dead", "max_age")]
    assert sum(1 for e in logs if e["event"] == "audit_event") == 1
    assert metrics.REGISTRY.get_sample_value("triaged_exports_dead_total", {"reason": "max_age"}) == before + 1
    with session_factory() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.state == JobState.DEAD and "72 h" in (job.last_error or "")
    with session_factory.begin() as session:
        assert queue.requeue(session, [job_id]) == [job_id]
    assert expire_old_exports(session_factory, settings, utcnow() + timedelta(hours=71)) == 0  # a new life


def test_purge_keeps_the_source_files_a_dead_export_still_needs(
    make_settings: Callable[..., Settings], session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    settings = make_settings(dicom={"peers": {"pacs": {"ae_title": "FAKEPACS", "port": 104}}})
    scenario = _seed(settings, session_factory, tmp_path)
    with session_factory.begin() as session:
        session.execute(Job.__table__.update().values(state=JobState.DEAD))
        for series in session.scalars(select(Series)):
            series.state = SeriesState.DONE
    later = utcnow() + timedelta(days=1)
    assert repo.purge_received_files(session_factory, scenario.runtime.store, later) == 0
    with session_factory() as session:
        files = [i.file_path for i in session.scalars(select(Instance))]
    assert files and all(scenario.runtime.store.path_for(f).is_file() for f in files)
    with session_factory.begin() as session:
        session.execute(Job.__table__.update().values(state=JobState.DONE))
    assert repo.purge_received_files(session_factory, scenario.runtime.store, later) == len(files)
