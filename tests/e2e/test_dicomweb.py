"""STOW-RS as a destination: a real Orthanc with its DICOMweb plugin (Debian ``orthanc-dicomweb``) on loopback.

The export handler and worker run against a real SQLite file; Orthanc stores what arrives and answers QIDO-RS.
An outage is a test-controlled TCP proxy in front of Orthanc's HTTP port, switched instantly; nothing waits for
time to pass (the clock is passed in, probes and connections are counted).
"""

from __future__ import annotations

import email
import io
import json
import ssl
import threading
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import contextmanager
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pydicom
import pytest
import requests
import urllib3
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from sqlalchemy.orm import Session, sessionmaker
from structlog.testing import capture_logs

from tests.integration.test_destinations import _destination, _run_one
from tests.integration.test_export import _job_state, _outputs, _seed
from tests.support.certs import make_certs
from tests.support.orthanc import Orthanc, orthanc_binary
from tests.support.tcp_proxy import TcpProxy, running_proxy
from triaged.config import Settings
from triaged.db.models import DestinationState, Job, JobState, utcnow
from triaged.errors import DicomPeerError, DicomSendError
from triaged.outputs import dicomweb
from triaged.outputs.destinations import probe_due_destinations, resolve_destination

pytestmark = [pytest.mark.orthanc]

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
USER, PASSWORD = "triaged", "s3cret-never-logged"
KOS = "1.2.840.10008.5.1.4.1.1.88.59"
KOS_ERROR_FILTER = f"""
function ReceivedInstanceFilter(dicom, origin, info)
  if dicom.SOPClassUID == '{KOS}' then error('refused by the test') end
  return true
end
"""


@pytest.fixture
def db_url(sqlite_url: str) -> str:
    """SQLite only: the breaker's queries run on PostgreSQL too in tests/integration/test_destinations.py."""
    return sqlite_url


def _plugin() -> str:
    orthanc_binary()
    if not PLUGIN.is_file():
        pytest.skip("needs Orthanc's DICOMweb plugin (Debian package orthanc-dicomweb)")
    return str(PLUGIN)


def _orthanc(root: Path, **config: Any) -> Orthanc:
    return Orthanc(
        root=root,
        modalities={},
        plugins=[_plugin()],
        users={USER: PASSWORD},
        extra_config={"DicomWeb": {"Enable": True, "Root": "/dicom-web/"}, **config},
    )


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    server = _orthanc(tmp_path / "orthanc")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def proxy(orthanc: Orthanc) -> Iterator[TcpProxy]:
    with running_proxy("127.0.0.1", orthanc.http_port) as running:
        yield running


def _settings(make_settings: Callable[..., Settings], port: int, **web: object) -> Settings:
    server = {"url": f"http://127.0.0.1:{port}/dicom-web", "auth": "basic", "username": USER, "password": PASSWORD}
    return make_settings(
        worker={"export_max_attempts": 2},
        outputs={
            "destination": "web",
            "dicomweb": {"web": {**server, **web}},
            "probe_base_seconds": 1,
            "probe_max_seconds": 4,
            "probe_timeout_seconds": 5,
        },
    )


def _qido_instances(orthanc: Orthanc) -> list[str]:
    session = requests.Session()
    session.auth = (USER, PASSWORD)
    client = DICOMwebClient(orthanc.url("/dicom-web"), session=session)
    try:
        found = client.search_for_instances()
    finally:
        session.close()
    return sorted(str(item["00080018"]["Value"][0]) for item in found)


def _instance_count(orthanc: Orthanc) -> int:
    return int(orthanc.get("/statistics")["CountInstances"])


def _no_secret(logs: list[MutableMapping[str, Any]], *texts: str | None) -> None:
    blob = json.dumps(logs, default=str) + "".join(t or "" for t in texts)
    assert PASSWORD not in blob


def test_stow_rs_delivers_every_output_once_and_qido_reads_them_back(
    orthanc: Orthanc, make_settings: Callable[..., Settings], session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    settings = _settings(make_settings, orthanc.http_port)
    scenario = _seed(settings, session_factory, tmp_path)
    with capture_logs() as logs:
        job, state = _run_one(scenario.runtime)
    assert job is not None and state == JobState.DONE
    outputs = _outputs(scenario.runtime)
    assert {o.kind for o in outputs} == {"sc", "kos", "sr"}
    assert all(o.sent_at is not None and o.destination == "web" for o in outputs)
    assert _qido_instances(orthanc) == sorted(o.sop_instance_uid for o in outputs)
    assert _instance_count(orthanc) == len(outputs)
    _no_secret(logs, _job_state(scenario.runtime, job.id).last_error)
    # At-least-once with stable UIDs: sending everything again stores nothing twice.
    again = dicomweb.send_files(
        [scenario.runtime.store.path_for(o.file_path) for o in outputs],
        dicomweb.DicomwebDestination("web", settings.outputs.dicomweb["web"]),
    )
    assert len(again) == len(outputs)
    assert _instance_count(orthanc) == len(outputs)


def test_outage_waits_without_spending_attempts_then_every_output_arrives_once(
    orthanc: Orthanc,
    proxy: TcpProxy,
    make_settings: Callable[..., Settings],
    session_factory: sessionmaker[Session],
    tmp_path: Path,
) -> None:
    settings = _settings(make_settings, proxy.port)
    scenario = _seed(settings, session_factory, tmp_path)
    runtime = scenario.runtime
    proxy.down()
    job, state = _run_one(runtime)
    assert job is not None and state == JobState.QUEUED
    waiting = _job_state(runtime, job.id)
    assert (waiting.attempts, waiting.destination) == (0, "web")
    assert _destination(runtime, "web").state == DestinationState.DOWN
    now = utcnow()
    probes = 3 * settings.worker.export_max_attempts  # longer than the attempt budget would have lasted
    for count in range(1, probes + 1):
        now += timedelta(hours=1)
        assert probe_due_destinations(session_factory, settings, now) == []
        assert _destination(runtime, "web").probes == count
    assert _job_state(runtime, job.id).attempts == 0
    assert _instance_count(orthanc) == 0
    proxy.up()
    assert probe_due_destinations(session_factory, settings, now + timedelta(hours=1)) == ["web"]
    _, state = _run_one(runtime)
    assert state == JobState.DONE
    assert _job_state(runtime, job.id).attempts == 1
    assert _qido_instances(orthanc) == sorted(o.sop_instance_uid for o in _outputs(runtime))
    assert _instance_count(orthanc) == len(_outputs(runtime))


def test_wrong_password_spends_attempts_and_is_never_logged(
    orthanc: Orthanc, make_settings: Callable[..., Settings], session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    settings = _settings(make_settings, orthanc.http_port, password=PASSWORD + "-wrong")
    scenario = _seed(settings, session_factory, tmp_path)
    with capture_logs() as logs:
        job, state = _run_one(scenario.runtime)
        _, second = _run_one(scenario.runtime)
    assert job is not None and state == JobState.QUEUED
    failed = _job_state(scenario.runtime, job.id)
    assert failed.attempts == 1 and "HTTP 401" in (failed.last_error or "")
    assert _destination(scenario.runtime, "web").state == DestinationState.UP  # it answered: not down
    assert _instance_count(orthanc) == 0
    _no_secret(logs, failed.last_error)
    assert second is None  # waiting out its backoff, not retried at once


def test_a_server_error_spends_an_attempt_and_the_retry_stores_nothing_twice(
    make_settings: Callable[..., Settings], session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    """Orthanc's Lua filter fails on the KOS: the request answers HTTP 500 after storing the others."""
    script = tmp_path / "filter.lua"
    script.write_text(KOS_ERROR_FILTER, encoding="utf-8")
    server = _orthanc(tmp_path / "orthanc", LuaScripts=[str(script)])
    server.start()
    try:
        settings = _settings(make_settings, server.http_port, timeout_seconds=20)
        scenario = _seed(settings, session_factory, tmp_path)
        job, state = _run_one(scenario.runtime)
        assert job is not None and state == JobState.QUEUED
        failed = _job_state(scenario.runtime, job.id)
        assert failed.attempts == 1 and "HTTP 500" in (failed.last_error or "")
        assert _destination(scenario.runtime, "web").state == DestinationState.UP  # it answered: not down
        outputs = _outputs(scenario.runtime)
        assert all(o.sent_at is None for o in outputs)  # nothing was confirmed, so nothing counts as sent
        stored = _instance_count(server)
        assert stored < len(outputs)
        with pytest.raises(DicomSendError):
            dicomweb.send_files(
                [scenario.runtime.store.path_for(o.file_path) for o in outputs],
                dicomweb.DicomwebDestination("web", settings.outputs.dicomweb["web"]),
            )
        assert _instance_count(server) == stored
    finally:
        server.stop()


def _server(handler: BaseHTTPRequestHandler) -> _Server:
    assert isinstance(handler.server, _Server)
    return handler.server


def _read_body(handler: BaseHTTPRequestHandler) -> bytes:
    """The request body, with or without chunked transfer encoding (dicomweb-client chunks requests > 1 MB)."""
    if "Content-Length" in handler.headers:
        return handler.rfile.read(int(handler.headers["Content-Length"]))
    body = b""
    while size := int(handler.rfile.readline().strip(), 16):
        body += handler.rfile.read(size)
        handler.rfile.readline()
    handler.rfile.readline()
    return body


class _Stow(BaseHTTPRequestHandler):
    """A scripted STOW-RS server that refuses Key Object Selection documents instance by instance.

    It parses the multipart/related request for real and answers with a Store Instances Response (PS3.18
    10.5.3): 200 when all were stored, 202 with a Failed SOP Sequence when some were refused, 409 when all were.
    """

    def do_POST(self) -> None:
        body = _read_body(self)
        message = email.message_from_bytes(
            b"Content-Type: " + self.headers["Content-Type"].encode() + b"\r\n\r\n" + body
        )
        stored, failed = Dataset(), Dataset()
        stored.ReferencedSOPSequence, failed.FailedSOPSequence = [], []
        for part in message.walk():
            if part.is_multipart():
                continue
            ds = pydicom.dcmread(io.BytesIO(bytes(part.get_payload(decode=True))))
            item = Dataset()
            item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
            if ds.SOPClassUID == KOS:
                item.FailureReason = 0xA700
                failed.FailedSOPSequence.append(item)
            else:
                _server(self).received.append(str(ds.SOPInstanceUID))
                stored.ReferencedSOPSequence.append(item)
        answer = Dataset()
        answer.ReferencedSOPSequence = stored.ReferencedSOPSequence
        answer.FailedSOPSequence = failed.FailedSOPSequence
        code = 409 if not stored.ReferencedSOPSequence else 202 if failed.FailedSOPSequence else 200
        payload = json.dumps(answer.to_json_dict()).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:
        return


class _Server(ThreadingHTTPServer):
    """What the scripted servers saw: stored SOP Instance UIDs, Authorization headers."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self.received: list[str] = []
        self.seen: list[str | None] = []


@contextmanager
def _serving(handler: type[BaseHTTPRequestHandler], context: ssl.SSLContext | None = None) -> Iterator[_Server]:
    server = _Server(handler)
    if context is not None:
        server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_per_instance_failures_from_the_failed_sop_sequence(
    make_settings: Callable[..., Settings], session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    """The KOS is refused (202 + Failed SOP Sequence): SC and SR are confirmed and never resent."""
    with _serving(_Stow) as server:
        settings = _settings(make_settings, server.server_address[1], auth="none")
        scenario = _seed(settings, session_factory, tmp_path)
        with capture_logs() as logs:
            job, state = _run_one(scenario.runtime)
        assert job is not None and state == JobState.QUEUED
        failed = _job_state(scenario.runtime, job.id)
        assert (
            failed.attempts == 1 and "1 failed" in (failed.last_error or "") and "0xA700" in (failed.last_error or "")
        )
        sent = {o.kind: o.sent_at is not None for o in _outputs(scenario.runtime)}
        assert sent == {"sc": True, "kos": False, "sr": True}
        assert [e["event"] for e in logs].count("dicomweb_store_failed") == 1
        assert _destination(scenario.runtime, "web").state == DestinationState.UP
        first = list(server.received)
        # The retry sends only the KOS; all refused now is a 409 with its Failed SOP Sequence.
        with session_factory.begin() as session:
            session.get(Job, job.id).run_after = utcnow()  # type: ignore[union-attr]
        _, state = _run_one(scenario.runtime)
        assert state == JobState.DEAD  # export_max_attempts = 2
        assert server.received == first
        assert "0 of 1" in (_job_state(scenario.runtime, job.id).last_error or "")


class _Qido(BaseHTTPRequestHandler):
    """Answers every GET with an empty QIDO-RS result and remembers the Authorization headers it saw."""

    seen: list[str | None]

    def do_GET(self) -> None:
        _server(self).seen.append(self.headers.get("Authorization"))
        body = b"[]"
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[_Server, Path]]:
    """A real HTTPS server on loopback with a certificate from the test CA."""
    certs = make_certs(tmp_path / "certs")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs.server_cert, certs.server_key)
    with _serving(_Qido, context) as server:
        yield server, certs.ca


def test_tls_is_verified_and_bearer_tokens_are_sent_but_never_shown(
    tls_server: tuple[_Server, Path], make_settings: Callable[..., Settings]
) -> None:
    server, ca = tls_server
    url = f"https://127.0.0.1:{server.server_address[1]}/dicom-web"
    token = "tok-never-logged"

    def destination(**web: object) -> dicomweb.DicomwebDestination:
        settings = make_settings(outputs={"destination": "web", "dicomweb": {"web": {"url": url, **web}}})
        found = resolve_destination(settings, "")
        assert isinstance(found, dicomweb.DicomwebDestination)
        return found

    # Verification is on by default: a certificate the system store does not know is refused (the peer is down).
    with pytest.raises(DicomPeerError, match="could not be reached: SSLError") as info:
        dicomweb.probe(destination())
    assert server.seen == []
    dicomweb.probe(destination(ca_file=ca, auth="bearer", token=token))
    assert server.seen == [f"Bearer {token}"]
    assert token not in str(destination(auth="bearer", token=token)) + str(info.value)
    assert token not in repr(destination(auth="bearer", token=token))
    with pytest.warns(urllib3.exceptions.InsecureRequestWarning):  # off only when configured so, and loudly
        dicomweb.probe(destination(verify_tls=False))
    assert server.seen[-1] is None
