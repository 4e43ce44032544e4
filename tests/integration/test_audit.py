"""The audit trail (issue 12 item 8): associations, stored instances and admin actions, on SQLite and PostgreSQL.

Associations are real pynetdicom associations on loopback; admin actions go through the real CLI. The
table is append-only in the database itself (triggers), and holds no raw UID.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import delete, select, update
from sqlalchemy.exc import DatabaseError
from typer.testing import CliRunner

from tests.support.connections import associate, close, rejection
from tests.support.receiver import receiver_settings, running_receiver, send, synthetic_series, wait_for
from triaged.cli.app import app
from triaged.db import audit
from triaged.db.models import AuditEvent, Job, JobKind, JobState
from triaged.log import uid_hash

runner = CliRunner()


def _events(session_factory, kind: str) -> list[AuditEvent]:
    with session_factory() as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.kind == kind).order_by(AuditEvent.id)))


def _config(tmp_path: Path, db_url: str) -> Path:
    config = tmp_path / "triaged.toml"
    config.write_text(f'data_dir = "{tmp_path / "cli"}"\nlog_level = "warning"\n[database]\nurl = "{db_url}"\n')
    return config


def test_associations_and_stored_instances_are_audited_with_hashed_uids_only(tmp_path, make_settings, session_factory):
    settings = receiver_settings(
        make_settings, dicom={"accept_unknown_peers": False, "peers": {"pacs": {"ae_title": "PACS1", "port": 104}}}
    )
    paths = synthetic_series(tmp_path / "src", 3)
    with running_receiver(settings, session_factory) as receiver:
        results = send(receiver, paths, calling_ae="PACS1")
        assert [r.status for r in results] == [0, 0, 0]
        for calling, called, reason in [("STRANGER", "TRIAGED", 3), ("PACS1", "ELSEWHERE", 7)]:
            ae, assoc = associate(receiver.port, calling_ae=calling, called_ae=called)
            assert rejection(assoc)[2] == reason
            close(ae, assoc)
        wait_for(lambda: len(_events(session_factory, audit.INSTANCES_STORED)) == 1)
        # A rejection is audited after its A-ASSOCIATE-RJ went out: wait for the rows, not for the peer.
        wait_for(lambda: len(_events(session_factory, audit.ASSOCIATION_REJECTED)) == 2)
    (accepted,) = _events(session_factory, audit.ASSOCIATION_ACCEPTED)
    assert (accepted.calling_ae_title, accepted.called_ae_title, accepted.outcome) == ("PACS1", "TRIAGED", "accepted")
    assert accepted.peer_address.startswith("127.0.0.1:")
    rejected = _events(session_factory, audit.ASSOCIATION_REJECTED)
    # Each rejection is written by its own association thread after its A-ASSOCIATE-RJ: the rows' order is the
    # threads' order, not the peers', so compare them as a set.
    assert sorted((e.calling_ae_title, e.called_ae_title, e.reason) for e in rejected) == [
        ("PACS1", "ELSEWHERE", "called_ae_not_recognised"),
        ("STRANGER", "TRIAGED", "calling_ae_not_recognised"),
    ]
    (stored,) = _events(session_factory, audit.INSTANCES_STORED)
    assert stored.detail["stored"] == 3 and stored.detail["refused"] == 0
    assert stored.detail["sop_instance_uid_hashes"] == [uid_hash(r.sop_instance_uid) for r in results]
    with session_factory() as session:
        dumped = json.dumps([e.detail for e in session.scalars(select(AuditEvent))])
    assert not any(r.sop_instance_uid in dumped for r in results)


def test_the_audit_table_is_append_only(session_factory):
    with session_factory.begin() as session:
        audit.record_admin_action(session, "retry", actor="alice", detail={"requeued": [1]})
    for statement in (update(AuditEvent).values(actor="mallory"), delete(AuditEvent)):
        with pytest.raises(DatabaseError, match="append-only"), session_factory.begin() as session:
            session.execute(statement)
    (event,) = _events(session_factory, audit.ADMIN_ACTION)
    assert (event.actor, event.reason, event.detail) == ("alice", "retry", {"requeued": [1]})


def test_admin_actions_from_the_cli_are_audited_and_listed(tmp_path, db_url, session_factory):
    with session_factory.begin() as session:
        job = Job(
            kind=JobKind.EXPORT, state=JobState.DEAD, attempts=3, max_attempts=3, dedupe_key="audit-test", payload={}
        )
        session.add(job)
        session.flush()
        job_id = job.id
    config = _config(tmp_path, db_url)
    result = runner.invoke(app, ["--config", str(config), "retry", str(job_id)])
    assert result.exit_code == 0, result.output

    result = runner.invoke(app, ["--config", str(config), "audit", "list", "--json"])
    assert result.exit_code == 0, result.output
    (event,) = json.loads(result.output)
    assert (event["kind"], event["reason"], event["actor"]) == ("admin_action", "retry", audit.os_user())
    assert event["detail"] == {"requested": [job_id], "requeued": [job_id]}

    table = runner.invoke(app, ["--config", str(config), "audit", "list", "--kind", "admin_action"])
    assert table.exit_code == 0 and "retry" in table.output and "requeued=1" in table.output
    future = (datetime.now(UTC) + timedelta(days=1)).date().isoformat()
    later = runner.invoke(app, ["--config", str(config), "audit", "list", "--since", future, "--json"])
    assert later.exit_code == 0 and json.loads(later.output) == []
    bad = runner.invoke(app, ["--config", str(config), "audit", "list", "--since", "yesterday"])
    assert bad.exit_code == 2 and "--since" in bad.output and "Traceback" not in bad.output
    bad_kind = runner.invoke(app, ["--config", str(config), "audit", "list", "--kind", "nope"])
    assert bad_kind.exit_code == 2 and "unknown kind" in bad_kind.output
