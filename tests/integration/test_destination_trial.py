"""A peer that answers C-ECHO but never accepts a C-STORE association does not flap until max age.

The probe finds it up, the next send finds it down again: that send was the destination's trial, and a failed
trial spends the job's attempt, so the job ends ``dead`` (loudly) after ``export_max_attempts`` such rounds.
Real parts only: a pynetdicom SCP that supports Verification and nothing else, the real worker, a SQLite file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import AE
from sqlalchemy.orm import Session, sessionmaker
from structlog.testing import capture_logs

from tests.integration.test_destinations import _destination, _run_one, _settings
from tests.integration.test_export import REFUSED_SOCKET, _job_state, _seed
from tests.support.fake_pacs import FakePacs, running_fake_pacs
from triaged.config import Settings
from triaged.db.models import DestinationState, JobState, utcnow
from triaged.outputs.destinations import probe_due_destinations

pytestmark = [REFUSED_SOCKET]

VERIFICATION = "1.2.840.10008.1.1"


@pytest.fixture
def db_url(sqlite_url: str) -> str:
    """SQLite only: the breaker's queries run on PostgreSQL too in tests/integration/test_destinations.py."""
    return sqlite_url


@pytest.fixture
def echo_only_port() -> Iterator[int]:
    """A DICOM node that answers C-ECHO and accepts no storage SOP class (a misconfigured PACS)."""
    ae = AE(ae_title="FAKEPACS")
    ae.add_supported_context(VERIFICATION, [ImplicitVRLittleEndian])
    server = ae.start_server(("127.0.0.1", 0), block=False)
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()


def test_a_peer_that_echoes_but_never_stores_ends_dead_after_its_attempts(
    echo_only_port: int,
    make_settings: Callable[..., Settings],
    session_factory: sessionmaker[Session],
    tmp_path: Path,
) -> None:
    settings = _settings(make_settings, echo_only_port)
    scenario = _seed(settings, session_factory, tmp_path)
    runtime = scenario.runtime
    job, state = _run_one(runtime)
    assert job is not None and state == JobState.QUEUED
    assert _job_state(runtime, job.id).attempts == 0  # the first outage is free: it was up, not on trial
    assert _destination(runtime).state == DestinationState.DOWN
    now = utcnow()
    rounds = 0
    with capture_logs() as logs:
        while state == JobState.QUEUED:
            now += timedelta(hours=1)
            assert probe_due_destinations(session_factory, settings, now) == ["pacs"]  # C-ECHO answers
            assert _destination(runtime).trial
            _, state = _run_one(runtime)
            rounds += 1
            assert _destination(runtime).state == DestinationState.DOWN and not _destination(runtime).trial
            assert rounds <= settings.worker.export_max_attempts
    assert state == JobState.DEAD and rounds == settings.worker.export_max_attempts
    assert _job_state(runtime, job.id).attempts == settings.worker.export_max_attempts
    assert [e["event"] for e in logs].count("export_dead") == 1


def test_a_confirmed_delivery_ends_the_trial(
    make_settings: Callable[..., Settings], session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    with running_fake_pacs() as pacs:
        _deliver_after_trial(pacs, make_settings, session_factory, tmp_path)


def _deliver_after_trial(
    pacs: FakePacs, make_settings: Callable[..., Settings], session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    from triaged.db import destinations

    settings = _settings(make_settings, pacs.port)
    scenario = _seed(settings, session_factory, tmp_path)
    with session_factory.begin() as session:
        destinations.mark_down(session, "pacs", "test", first_probe_after=timedelta(0))
    assert probe_due_destinations(session_factory, settings, utcnow() + timedelta(seconds=1)) == ["pacs"]
    assert _destination(scenario.runtime).trial
    _, state = _run_one(scenario.runtime)
    assert state == JobState.DONE
    assert not _destination(scenario.runtime).trial
    assert len(pacs.sop_instance_uids()) == 4
