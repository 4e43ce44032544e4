"""The JSON API and the login on a real uvicorn server (loopback) over real SQLite and PostgreSQL databases.

Rows are written the way the pipeline writes them; one source instance is a real DICOM file in the store,
so the study identifiers come from a header exactly as in production.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from structlog.testing import capture_logs
from typer.testing import CliRunner

from triaged.cli.app import app as cli_app
from triaged.config import Settings
from triaged.db import receivers, users
from triaged.db.models import (
    Association,
    AuditEvent,
    Instance,
    Job,
    JobKind,
    JobState,
    Result,
    ResultStatus,
    Series,
    SeriesState,
    SlicePrediction,
    Study,
    UserRole,
)
from triaged.dicom.synthetic import write_mr_series
from triaged.runtime import build_store
from triaged.web.app import create_app
from triaged.web.context import WebContext
from triaged.web.passwords import LoginLimiter, hash_password
from triaged.web.server import WebServer

NOW = datetime.now(UTC)
PASSWORD = "s3cret-password"


def _series(session: Any, study: Study, uid: str, minutes_ago: float, state: SeriesState) -> Series:
    received = NOW - timedelta(minutes=minutes_ago)
    series = Series(
        series_instance_uid=uid,
        study_id=study.id,
        modality="MR",
        state=state,
        instance_count=3,
        calling_ae_title="PACS1",
        first_received_at=received,
        last_received_at=received,
    )
    session.add(series)
    session.flush()
    return series


def _result(session: Any, series: Series, *, urgent: bool, label: str | None, status: ResultStatus) -> Result:
    result = Result(
        series_id=series.id,
        generation=1,
        model_name="densenet121-brainmri",
        model_version="1.2.0",
        model_sha256="a" * 64,
        status=status,
        reason=None if status == ResultStatus.ASSESSED else "diffusion-weighted series (DWI) is out of scope",
        label=label,
        probabilities={"glioma": 0.9, "meningioma": 0.05, "notumor": 0.03, "pituitary": 0.02} if label else {},
        urgency=0.998 if urgent else (0.01 if label else None),
        threshold=0.994 if label else None,
        urgent=urgent,
        created_at=series.last_received_at + timedelta(seconds=12),
    )
    session.add(result)
    session.flush()
    for index in range(3 if label else 0):
        session.add(
            SlicePrediction(
                result_id=result.id,
                slice_index=index,
                sop_instance_uid=f"{series.series_instance_uid}.{index}",
                probabilities=[0.9, 0.05, 0.03, 0.02],
                tumour_probability=0.97,
                in_brain=True,
                is_key=index == 1,
            )
        )
    return result


@pytest.fixture
def populated(tmp_path: Path, make_settings: Callable[..., Settings], db_url: str, session_factory: Any) -> Settings:
    settings = make_settings(database={"url": db_url}, http={"port": 0, "login_attempts": 3})
    store_dir = settings.storage_dir / "src"
    [source] = write_mr_series(
        [[[0.0, 1.0], [1.0, 0.0]]], store_dir, seed="web", attributes={"AccessionNumber": "ACC-77"}
    )
    with session_factory.begin() as session:
        study = Study(study_instance_uid="1.2.826.0.1.1")
        session.add(study)
        session.flush()
        urgent = _series(session, study, "1.2.826.0.1.1.1", 30, SeriesState.DONE)  # oldest, but urgent
        normal = _series(session, study, "1.2.826.0.1.1.2", 10, SeriesState.DONE)
        dwi = _series(session, study, "1.2.826.0.1.1.3", 20, SeriesState.DONE)
        _series(session, study, "1.2.826.0.1.1.4", 1, SeriesState.RECEIVING)  # newest, no result yet
        _result(session, urgent, urgent=True, label="glioma", status=ResultStatus.ASSESSED)
        _result(session, normal, urgent=False, label="notumor", status=ResultStatus.ASSESSED)
        _result(session, dwi, urgent=False, label=None, status=ResultStatus.NOT_ASSESSABLE)
        session.add(
            Instance(
                sop_instance_uid="1.2.826.0.1.1.1.9",
                series_id=urgent.id,
                sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                file_path=source.relative_to(settings.storage_dir).as_posix(),
                size_bytes=source.stat().st_size,
                sha256="0" * 64,
            )
        )
        session.add(
            Job(kind=JobKind.EXPORT, state=JobState.DEAD, dedupe_key="x", series_id=urgent.id, last_error="refused")
        )
        users.add_user(session, "admin", UserRole.ADMIN, hash_password(PASSWORD))
        users.add_user(session, "viewer", UserRole.VIEWER, hash_password(PASSWORD))
    return settings


@contextmanager
def serving(settings: Settings, session_factory: Any) -> Iterator[httpx.Client]:
    context = WebContext(
        settings=settings,
        session_factory=session_factory,
        store=build_store(settings),
        readiness=lambda: {"database": "ok"},
        limiter=LoginLimiter(settings.http.login_attempts, settings.http.login_window_seconds),
    )
    server = WebServer(create_app(context), settings.http)
    server.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", timeout=30) as client:
            yield client
    finally:
        server.stop()


def _token(session_factory: Any, name: str) -> dict[str, str]:
    with session_factory.begin() as session:
        return {"Authorization": f"Bearer {users.create_api_token(session, name)}"}


def test_every_route_but_the_probes_needs_a_login(populated: Settings, session_factory: Any) -> None:
    with serving(populated, session_factory) as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").json() == {"ready": True, "checks": {"database": "ok"}}
        assert client.get("/metrics").status_code == 401  # unless http.public_metrics = true
        for path in (
            "/api/v1/series",
            "/api/v1/series/1.2.826.0.1.1.1",
            "/api/v1/jobs",
            "/api/v1/destinations",
            "/api/v1/receivers",
        ):
            assert client.get(path).status_code == 401, path
        assert client.get("/api/v1/model").status_code == 401
        assert client.get("/api/v1/openapi.json").status_code == 401
        assert client.get("/api/v1/outputs/1.2.3/image.png").status_code == 401
        assert client.post("/api/v1/series/1.2.826.0.1.1.1/reprocess").status_code == 401
        for path in ("/", "/series/1.2.826.0.1.1.1", "/queue", "/receivers", "/destinations", "/model"):
            response = client.get(path)
            assert response.status_code == 303 and response.headers["location"].startswith("/login?next="), path
        assert client.get("/api/v1/series", headers={"Authorization": "Bearer tri_wrong"}).status_code == 401
        assert client.get("/docs").status_code == 404  # Swagger UI would load scripts from a CDN


def test_worklist_urgent_first_then_newest_with_filters(populated: Settings, session_factory: Any) -> None:
    headers = _token(session_factory, "viewer")
    with serving(populated, session_factory) as client:
        page = client.get("/api/v1/series", headers=headers).json()
        assert page["total"] == 4
        uids = [item["series_instance_uid"][-1] for item in page["items"]]
        assert uids == ["1", "4", "2", "3"]  # urgent, then newest first
        top = page["items"][0]
        assert (top["urgent"], top["label"], top["urgency"], top["threshold"]) == (True, "glioma", 0.998, 0.994)
        assert top["seconds_to_result"] == pytest.approx(12, abs=0.01)
        dwi = page["items"][3]
        assert dwi["result_status"] == "not_assessable" and "DWI" in dwi["not_assessable_reason"]
        urgent_only = client.get("/api/v1/series", params={"urgent": "true"}, headers=headers).json()
        assert [i["series_instance_uid"] for i in urgent_only["items"]] == ["1.2.826.0.1.1.1"]
        receiving = client.get("/api/v1/series", params={"state": "receiving"}, headers=headers).json()
        assert receiving["total"] == 1
        since = (NOW - timedelta(minutes=15)).isoformat()
        recent = client.get("/api/v1/series", params={"received_from": since}, headers=headers).json()
        assert {i["series_instance_uid"][-1] for i in recent["items"]} == {"2", "4"}
        second = client.get("/api/v1/series", params={"limit": 2, "offset": 2}, headers=headers).json()
        assert [i["series_instance_uid"][-1] for i in second["items"]] == ["2", "3"] and second["total"] == 4
        assert client.get("/api/v1/series", params={"limit": 0}, headers=headers).status_code == 422
        dead = client.get("/api/v1/jobs", params={"state": ["dead", "failed"]}, headers=headers).json()
        assert [(j["state"], j["last_error"]) for j in dead["items"]] == [("dead", "refused")]


def test_series_detail_shows_accession_but_no_patient_unless_configured(
    populated: Settings, session_factory: Any
) -> None:
    headers = _token(session_factory, "viewer")
    with serving(populated, session_factory) as client:
        detail = client.get("/api/v1/series/1.2.826.0.1.1.1", headers=headers).json()
        page = client.get("/series/1.2.826.0.1.1.1", headers=headers)  # bearer tokens are not page logins
        assert page.status_code == 303
        assert client.get("/api/v1/series/9.9.9", headers=headers).status_code == 404
    assert detail["identifiers"] == {"accession_number": "ACC-77", "patient_name": None, "patient_id": None}
    (result,) = detail["results"]
    assert [s["is_key"] for s in result["slices"]] == [False, True, False]
    assert result["probabilities"]["glioma"] == 0.9
    shown = populated.model_copy(update={"http": populated.http.model_copy(update={"show_patient_identifiers": True})})
    with serving(shown, session_factory) as client:
        detail = client.get("/api/v1/series/1.2.826.0.1.1.1", headers=headers).json()
    assert detail["identifiers"]["patient_name"] == "TRIAGED^DEMO"
    assert detail["identifiers"]["patient_id"] == "DEMO0001"


def test_only_admins_act_and_they_call_the_cli_functions(populated: Settings, session_factory: Any) -> None:
    viewer, admin = _token(session_factory, "viewer"), _token(session_factory, "admin")
    with serving(populated, session_factory) as client:
        assert client.post("/api/v1/series/1.2.826.0.1.1.2/reprocess", headers=viewer).status_code == 403
        done = client.post("/api/v1/series/1.2.826.0.1.1.2/reprocess", headers=admin).json()
        assert done["action"] == "reprocess" and len(done["job_ids"]) == 1
        again = client.post("/api/v1/series/1.2.826.0.1.1.2/reprocess", headers=admin).json()
        assert again["job_ids"] == []  # already queued: the same dedupe as `triaged reprocess`
        still_receiving = client.post("/api/v1/series/1.2.826.0.1.1.4/reprocess", headers=admin).json()
        assert still_receiving["job_ids"] == []
        assert client.post("/api/v1/series/9.9.9/resend", headers=admin).status_code == 404
        resent = client.post("/api/v1/series/1.2.826.0.1.1.1/resend", headers=admin).json()
        assert len(resent["job_ids"]) == 1
        with session_factory() as session:
            dead_id = session.query(Job).filter(Job.state == JobState.DEAD).one().id
        assert client.post(f"/api/v1/jobs/{dead_id}/retry", headers=viewer).status_code == 403
        assert client.post(f"/api/v1/jobs/{dead_id}/retry", headers=admin).json()["job_ids"] == [dead_id]
        assert client.post("/api/v1/jobs/999999/retry", headers=admin).status_code == 404
    with session_factory() as session:
        job = session.get(Job, done["job_ids"][0])
        assert job is not None and job.kind == JobKind.INFER and job.priority < 0  # REPROCESS_PRIORITY
        assert session.get(Job, dead_id).state == JobState.QUEUED
        audited = session.scalars(select(AuditEvent).order_by(AuditEvent.id)).all()
    # Every admin action that reached its function is in the audit trail, by the signed-in user.
    assert [(e.reason, e.actor, e.detail["via"]) for e in audited] == [
        ("reprocess", "admin", "web"),
        ("reprocess", "admin", "web"),
        ("reprocess", "admin", "web"),
        ("resend", "admin", "web"),
        ("retry", "admin", "web"),
    ]
    assert audited[-1].detail["requeued"] == [dead_id]


def test_receivers_show_who_is_alive_and_who_holds_open_associations(populated: Settings, session_factory: Any) -> None:
    timeout = populated.dicom.receiver_timeout_seconds
    receivers.register(session_factory, "mr-host:TRIAGED:11112", host="mr-host", pid=41)
    receivers.register(
        session_factory, "gone-host:TRIAGED:11112", host="gone-host", pid=42, now=NOW - timedelta(seconds=3 * timeout)
    )
    with session_factory.begin() as session:
        session.add(
            Association(
                receiver_id="gone-host:TRIAGED:11112",
                calling_ae_title="MODALITY",
                peer_address="10.0.0.9",
            )
        )
    headers = _token(session_factory, "viewer")
    with serving(populated, session_factory) as client:
        listed = client.get("/api/v1/receivers", headers=headers).json()
        client.post("/login", data={"name": "viewer", "password": PASSWORD})
        page = client.get("/receivers")
    assert [(r["id"], r["host"], r["state"], r["open_associations"]) for r in listed] == [
        ("gone-host:TRIAGED:11112", "gone-host", "dead", 1),
        ("mr-host:TRIAGED:11112", "mr-host", "alive", 0),
    ]
    assert page.status_code == 200
    rows = page.text.split("<tbody>", 1)[1]
    assert "gone-host" in rows and 'state-dead">dead' in rows and 'state-alive">alive' in rows


def test_login_sets_a_strict_session_cookie_and_logout_ends_it(populated: Settings, session_factory: Any) -> None:
    with serving(populated, session_factory) as client:
        response = client.post("/login", data={"name": "viewer", "password": PASSWORD, "next": "/queue"})
        assert response.status_code == 303 and response.headers["location"] == "/queue"
        cookie = response.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Secure" not in cookie
        assert client.get("/api/v1/series").status_code == 200  # the cookie works for the API too
        page = client.get("/")
        assert page.status_code == 200 and "URGENT" in page.text and "ACC-77" in page.text
        assert "TRIAGED^DEMO" not in page.text and "DEMO0001" not in page.text
        series = client.get("/series/1.2.826.0.1.1.1")
        assert series.status_code == 200 and '<svg class="strip"' in series.text
        assert "Reprocess" not in series.text  # a viewer gets no action buttons
        assert client.post("/series/1.2.826.0.1.1.1/reprocess").status_code == 403
        assert client.post("/logout").status_code == 303
        client.cookies.set("triaged_session", cookie.split(";")[0].split("=", 1)[1])
        assert client.get("/api/v1/series").status_code == 401  # the server forgot the session
        off_site = client.post("/login", data={"name": "viewer", "password": PASSWORD, "next": "//evil.example"})
        assert off_site.headers["location"] == "/"
    secure = populated.model_copy(update={"http": populated.http.model_copy(update={"secure_cookies": True})})
    with serving(secure, session_factory) as client:
        response = client.post("/login", data={"name": "viewer", "password": PASSWORD})
        assert "Secure" in response.headers["set-cookie"]


def test_failed_logins_are_rate_limited_and_logged_without_the_password(
    populated: Settings, session_factory: Any
) -> None:
    with capture_logs() as logs, serving(populated, session_factory) as client:
        for attempt in range(3):
            response = client.post("/login", data={"name": "admin", "password": f"guess-{attempt}-xyzzy"})
            assert response.status_code == 401 and "Wrong name or password" in response.text
        blocked = client.post("/login", data={"name": "admin", "password": PASSWORD})
        assert blocked.status_code == 429 and "Too many failed logins" in blocked.text
        unknown = client.post("/login", data={"name": "nobody", "password": "guess-nobody-xyzzy"})
        assert unknown.status_code == 429  # the same client is limited whatever name it tries
    failed = [e for e in logs if e["event"] == "login_failed"]
    assert [e["failures"] for e in failed] == [1, 2, 3] and all(e["user"] == "admin" for e in failed)
    assert any(e["event"] == "login_rate_limited" for e in logs)
    assert "xyzzy" not in repr(logs) and PASSWORD not in repr(logs)


def test_cli_series_list_shows_finding_urgency_and_reason(
    populated: Settings, session_factory: Any, tmp_path: Path, db_url: str
) -> None:
    config = tmp_path / "cli.toml"
    config.write_text(f'data_dir = "{tmp_path / "cli"}"\nlog_level = "warning"\n[database]\nurl = "{db_url}"\n')
    result = CliRunner().invoke(cli_app, ["--config", str(config), "series", "list"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "FINDING" in lines[0] and "URGENCY / THRESHOLD" in lines[0] and "REASON" in lines[0]
    assert "URGENT glioma" in lines[1] and "0.998 / 0.994" in lines[1]  # urgent first
    assert any("not assessable" in line and "DWI" in line for line in lines)
    as_json = CliRunner().invoke(cli_app, ["--config", str(config), "series", "list", "--urgent", "--json"])
    assert [s["series_instance_uid"] for s in json.loads(as_json.output)] == ["1.2.826.0.1.1.1"]


def test_tls_serves_https_and_marks_the_session_cookie_secure(
    populated: Settings, session_factory: Any, tmp_path: Path
) -> None:
    from tests.support.certs import make_certs

    certs = make_certs(tmp_path / "certs")
    tls = populated.http.model_copy(update={"tls_cert_file": certs.server_cert, "tls_key_file": certs.server_key})
    settings = populated.model_copy(update={"http": tls})
    context = WebContext(
        settings=settings,
        session_factory=session_factory,
        store=build_store(settings),
        readiness=lambda: {"database": "ok"},
        limiter=LoginLimiter(3, 60),
    )
    server = WebServer(create_app(context), settings.http)
    server.start()
    try:
        assert server.scheme == "https"
        with httpx.Client(
            base_url=f"https://127.0.0.1:{server.port}",
            verify=ssl.create_default_context(cafile=str(certs.ca)),
            timeout=30,
        ) as client:
            response = client.post("/login", data={"name": "viewer", "password": PASSWORD})
            assert response.status_code == 303
            assert "Secure" in response.headers["set-cookie"] and "HttpOnly" in response.headers["set-cookie"]
            assert client.get("/api/v1/model").status_code == 200
    finally:
        server.stop()
