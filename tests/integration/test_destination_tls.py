"""Outbound TLS: outputs reach a destination that requires TLS (and a client certificate); a TLS failure is a down
destination, not a spent attempt. Real TLS on loopback (openssl-made certificates, pynetdicom on both sides)."""

from __future__ import annotations

import ssl
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from tests.integration.test_export import REFUSED_SOCKET, WORKER, _job_state, _outputs, _seed
from tests.support.certs import Certs, make_certs
from tests.support.fake_pacs import FakePacs, running_fake_pacs
from triaged.config import Settings
from triaged.db import queue
from triaged.db.models import DestinationState, DestinationStatus, JobKind, JobState, utcnow
from triaged.errors import ConfigError
from triaged.outputs.destinations import probe_due_destinations, resolve_destination
from triaged.runtime import Runtime
from triaged.worker import Worker

pytestmark = [REFUSED_SOCKET]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def _server_context(certs: Certs, *, require_client_cert: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(certs.ca))
    context.load_cert_chain(str(certs.server_cert), str(certs.server_key))
    context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_NONE
    return context


@pytest.fixture
def tls_pacs(certs: Certs) -> Iterator[FakePacs]:
    with running_fake_pacs(ssl_context=_server_context(certs, require_client_cert=True)) as fake:
        yield fake


def _settings(make_settings: Callable[..., Settings], port: int, tls: dict[str, object]) -> Settings:
    return make_settings(
        dicom={
            "peers": {"pacs": {"ae_title": "FAKEPACS", "host": "127.0.0.1", "port": port, "tls": tls}},
            "acse_timeout": 5,
            "dimse_timeout": 5,
            "network_timeout": 5,
        },
        outputs={"probe_timeout_seconds": 5},
    )


def _run_one(runtime: Runtime) -> JobState | None:
    job = queue.claim(runtime.session_factory, worker_id=WORKER, kinds=[JobKind.EXPORT], lease_seconds=60)
    if job is None:
        return None
    return Worker(runtime, worker_id=WORKER, stop=threading.Event(), kinds=[JobKind.EXPORT]).run_job(job)


def _state(runtime: Runtime) -> DestinationState:
    with runtime.session_factory() as session:
        row = session.get(DestinationStatus, "pacs")
        assert row is not None
        return DestinationState(row.state)


def test_outputs_reach_a_tls_destination_with_a_client_certificate(
    tls_pacs: FakePacs,
    certs: Certs,
    make_settings: Callable[..., Settings],
    session_factory: sessionmaker[Session],
    tmp_path: Path,
) -> None:
    tls = {
        "enabled": True,
        "ca_file": str(certs.ca),
        "cert_file": str(certs.client_cert),
        "key_file": str(certs.client_key),
    }
    scenario = _seed(_settings(make_settings, tls_pacs.port, tls), session_factory, tmp_path)
    assert _run_one(scenario.runtime) == JobState.DONE
    assert sorted(tls_pacs.sop_instance_uids()) == sorted(o.sop_instance_uid for o in _outputs(scenario.runtime))


@pytest.mark.parametrize("how", ["plain TCP", "no client certificate", "untrusted server"])
def test_a_tls_failure_is_a_down_destination_not_a_spent_attempt(
    how: str,
    *,
    tls_pacs: FakePacs,
    certs: Certs,
    make_settings: Callable[..., Settings],
    session_factory: sessionmaker[Session],
    tmp_path: Path,
) -> None:
    tls: dict[str, object] = {
        "plain TCP": {"enabled": False},
        "no client certificate": {"enabled": True, "ca_file": str(certs.ca)},
        "untrusted server": {  # the rogue certificate is a CA of its own: it did not sign the PACS's certificate
            "enabled": True,
            "ca_file": str(certs.rogue_cert),
            "cert_file": str(certs.client_cert),
            "key_file": str(certs.client_key),
        },
    }[how]
    settings = _settings(make_settings, tls_pacs.port, tls)
    scenario = _seed(settings, session_factory, tmp_path)
    assert _run_one(scenario.runtime) == JobState.QUEUED
    job = _job_state(scenario.runtime, 1)
    assert (job.state, job.attempts) == (JobState.QUEUED, 0)
    assert _state(scenario.runtime) == DestinationState.DOWN
    assert tls_pacs.received == []
    # The probe speaks the same TLS: it fails the same way, so the destination stays down.
    assert probe_due_destinations(session_factory, settings, utcnow() + timedelta(hours=1)) == []
    assert _state(scenario.runtime) == DestinationState.DOWN


def test_a_tls_destination_is_probed_over_tls(
    tls_pacs: FakePacs,
    certs: Certs,
    make_settings: Callable[..., Settings],
    session_factory: sessionmaker[Session],
    tmp_path: Path,
) -> None:
    tls = {
        "enabled": True,
        "ca_file": str(certs.ca),
        "cert_file": str(certs.client_cert),
        "key_file": str(certs.client_key),
    }
    settings = _settings(make_settings, tls_pacs.port, tls)
    scenario = _seed(settings, session_factory, tmp_path)
    from triaged.db import destinations

    with session_factory.begin() as session:
        destinations.mark_down(session, "pacs", "test", first_probe_after=timedelta(0))
    assert probe_due_destinations(session_factory, settings, utcnow() + timedelta(seconds=1)) == ["pacs"]
    assert _run_one(scenario.runtime) == JobState.DONE


def test_unreadable_client_certificate_is_a_one_line_config_error(
    certs: Certs, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    missing = tmp_path / "nope.pem"
    settings = _settings(
        make_settings,
        104,
        {"enabled": True, "cert_file": str(missing), "key_file": str(missing), "ca_file": str(certs.ca)},
    )
    with pytest.raises(ConfigError, match=r"dicom\.peers\.pacs\.tls: cannot load certificates") as info:
        resolve_destination(settings, "FAKEPACS")
    assert "\n" not in str(info.value) and not info.value.retryable
    with pytest.raises(ConfigError, match="cert_file and key_file go together"):
        _settings(make_settings, 104, {"enabled": True, "cert_file": str(certs.client_cert)})
