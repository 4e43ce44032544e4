"""HL7 ORU^R01 to a worklist over MLLP: a real MLLP listener on loopback that parses what it receives and ACKs.

The listener is python-hl7's asyncio MLLP server in a thread; it answers each message with the ACK code the test
scripts (AA, AE). An outage is the test-controlled TCP proxy in front of it. The notification job runs through
the real worker against a real SQLite file; nothing waits for time to pass (the clock is passed in).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Callable, Iterator, MutableMapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import hl7
import pydicom
import pytest
from hl7.mllp import start_hl7_server
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker
from structlog.testing import capture_logs

from tests.integration.test_destinations import _destination, _run_one
from tests.integration.test_export import REFUSED_SOCKET, Scenario, _job_state, _seed
from tests.support.tcp_proxy import TcpProxy, running_proxy
from triaged.config import Settings
from triaged.db import queue
from triaged.db.models import DestinationState, Instance, Job, JobKind, JobState, Result, ResultStatus, utcnow
from triaged.notify import notify_targets
from triaged.outputs.destinations import probe_due_destinations

pytestmark = [REFUSED_SOCKET]

PATIENT_ID, PATIENT_NAME, ACCESSION = "PID-0042", "Doe^Jane", "ACC|7^X"


class Listener:
    """A real MLLP receiver: parses every message with python-hl7 and ACKs with the next scripted code."""

    def __init__(self, codes: list[str]) -> None:
        self.codes = codes
        self.messages: list[hl7.Message] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.port = 0

    async def _handle(self, reader: Any, writer: Any) -> None:
        try:
            while not reader.at_eof():
                message = await reader.readmessage()
                self.messages.append(message)
                code = self.codes.pop(0) if self.codes else "AA"
                writer.writemessage(message.create_ack(code, message_id="ACK1"))
                await writer.drain()
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def main() -> None:
            self._server = await start_hl7_server(self._handle, "127.0.0.1", 0)
            self.port = self._server.sockets[0].getsockname()[1]
            self._ready.set()
            await self._server.serve_forever()

        with contextlib.suppress(asyncio.CancelledError):
            self._loop.run_until_complete(main())

    def start(self) -> None:
        self._thread.start()
        assert self._ready.wait(30)

    def stop(self) -> None:
        def close() -> None:
            self._server.close()
            for task in asyncio.all_tasks(self._loop):
                task.cancel()

        self._loop.call_soon_threadsafe(close)
        self._thread.join(30)
        self._loop.close()


@pytest.fixture
def db_url(sqlite_url: str) -> str:
    """SQLite only: the breaker's queries run on PostgreSQL too in tests/integration/test_destinations.py."""
    return sqlite_url


@pytest.fixture
def listener() -> Iterator[Listener]:
    server = Listener([])
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _settings(make_settings: Callable[..., Settings], port: int, **ris: object) -> Settings:
    return make_settings(
        worker={"export_max_attempts": 3},
        outputs={"probe_base_seconds": 1, "probe_max_seconds": 4},
        notify={"ris": {"port": port, "receiving_application": "RIS", "timeout_seconds": 10, **ris}},
    )


def _scenario(settings: Settings, session_factory: sessionmaker[Session], tmp_path: Path) -> tuple[Scenario, int]:
    """A triaged series whose source headers carry an ID, a name and an accession with HL7 delimiters in it."""
    scenario = _seed(settings, session_factory, tmp_path)
    store = scenario.runtime.store
    with session_factory.begin() as session:
        for instance in session.query(Instance).all():
            path = store.path_for(instance.file_path)
            ds = pydicom.dcmread(path)
            ds.PatientID, ds.PatientName, ds.AccessionNumber = PATIENT_ID, PATIENT_NAME, ACCESSION
            ds.save_as(path, enforce_file_format=True)
        session.execute(update(Job).values(state=JobState.DONE))  # the DICOM export: not under test here
        result = session.get(Result, scenario.result_id)
        assert result is not None
        assert notify_targets(settings, result) == ["ris"]
        job = queue.enqueue(
            session,
            JobKind.EXPORT,
            dedupe_key=f"notify:ris:{result.id}",
            payload={"result_id": result.id, "notify": "ris"},
            max_attempts=settings.worker.export_max_attempts,
        )
        assert job is not None
        session.flush()
        job_id = job.id
    return scenario, job_id


def _obx(message: hl7.Message) -> dict[str, str]:
    return {
        f"{segment(3)(1)(1)}{'/' + str(segment(4)) if str(segment(4)) else ''}": str(segment(5))
        for segment in message.segments("OBX")
    }


def _no_phi(logs: list[MutableMapping[str, Any]]) -> None:
    blob = json.dumps(logs, default=str)
    assert PATIENT_ID not in blob and "Doe" not in blob and "ACC" not in blob


def test_an_oru_reaches_the_worklist_with_the_result_and_without_the_patient_name(
    listener: Listener, make_settings: Callable[..., Settings], session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    settings = _settings(make_settings, listener.port)
    scenario, job_id = _scenario(settings, session_factory, tmp_path)
    with capture_logs() as logs:
        job, state = _run_one(scenario.runtime)
    assert job is not None and job.id == job_id and state == JobState.DONE
    assert len(listener.messages) == 1
    message = listener.messages[0]
    msh = message.segment("MSH")
    assert (str(msh(9)), str(msh(12)), str(msh(5))) == ("ORU^R01^ORU_R01", "2.5.1", "RIS")
    pid = message.segment("PID")
    assert str(pid(3)(1)(1)) == PATIENT_ID and str(pid(5)) == ""
    obr = message.segment("OBR")
    assert message.unescape(str(obr(3))) == ACCESSION and str(obr(5)) == "S"
    obx = _obx(message)
    assert obx["URGENT"] == "Y^Yes^HL70136" and obx["LABEL"].startswith("glioma^")
    assert (obx["URGENCY"], obx["THRESHOLD"]) == ("0.70", "0.50")
    assert obx["PROB/glioma"] == "0.7000" and obx["MODEL"] == "densenet121-brainmri 0.1.0"
    with session_factory() as session:
        source = session.get(Result, scenario.result_id)
        assert source is not None
    assert obx["112002/AI_SC"].startswith("2.25.") and obx["110180"] != obx["112002/SOURCE"]
    assert [e["event"] for e in logs].count("notify_done") == 1
    _no_phi(logs)


def test_the_patient_name_is_sent_only_when_configured(
    listener: Listener, make_settings: Callable[..., Settings], session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    settings = _settings(make_settings, listener.port, include_patient_name=True)
    scenario, _ = _scenario(settings, session_factory, tmp_path)
    _, state = _run_one(scenario.runtime)
    assert state == JobState.DONE
    name = listener.messages[0].segment("PID")(5)
    assert (str(name(1)(1)), str(name(1)(2))) == ("Doe", "Jane")


def test_an_application_error_ack_spends_an_attempt_and_the_retry_is_the_same_message(
    listener: Listener, make_settings: Callable[..., Settings], session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    listener.codes[:] = ["AE"]
    settings = _settings(make_settings, listener.port)
    scenario, job_id = _scenario(settings, session_factory, tmp_path)
    _, state = _run_one(scenario.runtime)
    assert state == JobState.QUEUED
    failed = _job_state(scenario.runtime, job_id)
    assert failed.attempts == 1 and "answered AE" in (failed.last_error or "")
    assert _destination(scenario.runtime, "ris").state == DestinationState.UP  # it answered: not down
    assert _run_one(scenario.runtime) == (None, None)  # waits out its backoff
    with session_factory.begin() as session:
        session.execute(update(Job).where(Job.id == job_id).values(run_after=utcnow()))
    _, state = _run_one(scenario.runtime)
    assert state == JobState.DONE and _job_state(scenario.runtime, job_id).attempts == 2
    ids = [str(m.segment("MSH")(10)) for m in listener.messages]
    assert len(ids) == 2 and ids[0] == ids[1]


def test_a_receiver_that_is_down_costs_no_attempts_and_gets_the_message_once_back(
    listener: Listener, make_settings: Callable[..., Settings], session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    with running_proxy("127.0.0.1", listener.port) as proxy:
        _outage(proxy, listener, make_settings, session_factory, tmp_path)


def _outage(
    proxy: TcpProxy,
    listener: Listener,
    make_settings: Callable[..., Settings],
    session_factory: sessionmaker[Session],
    tmp_path: Path,
) -> None:
    # The probe waits timeout_seconds for the proxy to reset its connection: generous, so load cannot fool it.
    settings = _settings(make_settings, proxy.port, timeout_seconds=5)
    scenario, job_id = _scenario(settings, session_factory, tmp_path)
    runtime = scenario.runtime
    proxy.hang()  # accepts the connection, never answers: no ACK in time is "not there"
    _, state = _run_one(runtime)
    assert state == JobState.QUEUED
    assert _destination(runtime, "ris").state == DestinationState.DOWN
    proxy.down()
    now = utcnow()
    for count in range(1, 3 * settings.worker.export_max_attempts + 1):
        now += timedelta(hours=1)
        assert probe_due_destinations(session_factory, settings, now) == []
        assert _destination(runtime, "ris").probes == count
    assert _job_state(runtime, job_id).attempts == 0 and listener.messages == []
    proxy.up()
    assert probe_due_destinations(session_factory, settings, now + timedelta(hours=1)) == ["ris"]
    _, state = _run_one(runtime)
    assert state == JobState.DONE and _job_state(runtime, job_id).attempts == 1
    assert len(listener.messages) == 1


def test_only_assessed_series_are_notified_and_urgent_only_receivers_only_for_urgent_ones(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(notify={"all": {"port": 2575}, "urgent": {"port": 2576, "mode": "urgent"}})

    def result(status: ResultStatus, urgent: bool) -> Result:
        return Result(status=status, urgent=urgent)

    assert notify_targets(settings, result(ResultStatus.ASSESSED, True)) == ["all", "urgent"]
    assert notify_targets(settings, result(ResultStatus.ASSESSED, False)) == ["all"]
    assert notify_targets(settings, result(ResultStatus.NOT_ASSESSABLE, False)) == []
