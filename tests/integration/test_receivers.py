"""A receiver that is gone for good: its heartbeat runs out, the reaper closes its associations, its series complete.

On a real SQLite file and the PostgreSQL server. Clocks are ``now=`` arguments, never sleeps: a receiver killed
with SIGKILL mid-association (a real process, :mod:`tests.support.receiver_main`) is reaped exactly when its
heartbeat is older than ``dicom.receiver_timeout_seconds``, not a moment before, and its series is queued once.
The CLI (`triaged receivers list/forget`) runs through Typer's runner.
"""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pynetdicom import AE
from sqlalchemy import select
from structlog.testing import capture_logs
from typer.testing import CliRunner

from tests.support.receiver import receiver_settings, running_receiver, spawn_receiver, synthetic_series, wait_for
from tests.support.triaged_daemon import TriagedDaemon
from triaged import metrics
from triaged.cli.app import app
from triaged.config import Settings
from triaged.db import audit, receivers
from triaged.db.engine import make_engine, make_session_factory
from triaged.db.models import Association, AuditEvent, Instance, Job, JobKind, Receiver, Series, SeriesState
from triaged.db.schema import upgrade
from triaged.errors import ConfigError, NotFoundError
from triaged.log import uid_hash
from triaged.outputs.send import close_socket, read_dicom_file
from triaged.receive.associations import close_stale_associations, default_receiver_id
from triaged.receive.pool import ReceiverPool
from triaged.receive.series import sweep_complete_series

runner = CliRunner()
TIMEOUT = 60.0
T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def _events(session_factory, kind: str) -> list[AuditEvent]:
    with session_factory() as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.kind == kind).order_by(AuditEvent.id)))


def _open(session_factory, receiver_id: str) -> list[int]:
    with session_factory() as session:
        return list(
            session.scalars(
                select(Association.id).where(Association.receiver_id == receiver_id, Association.closed_at.is_(None))
            )
        )


def _add_association(session_factory, receiver_id: str, *, opened_at: datetime = T0) -> int:
    with session_factory.begin() as session:
        row = Association(
            calling_ae_title="PACS", peer_address="10.0.0.9:104", receiver_id=receiver_id, opened_at=opened_at
        )
        session.add(row)
        session.flush()
        return row.id


def _infer_jobs(session_factory) -> list[Job]:
    with session_factory() as session:
        return list(session.scalars(select(Job).where(Job.kind == JobKind.INFER)))


def _store_then_die(tmp_path: Path, db_url: str, paths: list[Path]) -> list[str]:
    """A receiver process stores ``paths`` on one association and is SIGKILLed before it is released."""
    overrides: dict[str, object] = {
        "data_dir": str(tmp_path / "data"),
        "database": {"url": db_url},
        "storage": {"min_free_bytes": 0},
        "dicom": {"bind_address": "127.0.0.1", "ae_title": "TRIAGED"},
    }
    proc, port = spawn_receiver(overrides, tmp_path, "doomed")
    return _store_then_kill(proc, port, paths)


def _store_then_kill(proc: subprocess.Popen[bytes], port: int, paths: list[Path]) -> list[str]:
    files = [read_dicom_file(p) for p in paths]
    ae = AE(ae_title="GONESCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(files[0].sop_class_uid, files[0].transfer_syntax_uid)
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="TRIAGED")
        assert assoc.is_established
        acked = [f.sop_instance_uid for f in files if assoc.send_c_store(f.path).get("Status") == 0]
        proc.kill()  # the host is gone: no release, no close, no more heartbeats
        proc.wait(30)
        close_socket(assoc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        ae.shutdown()
    return acked


def _closed_metric(outcome: str) -> float:
    """This process's ``triaged_associations_closed_for_gone_receiver`` count for ``outcome``."""
    value = metrics.REGISTRY.get_sample_value(
        "triaged_associations_closed_for_gone_receiver_total", {"outcome": outcome}
    )
    return value or 0.0


def test_a_gone_receivers_association_is_reaped_after_the_timeout_and_its_series_queued_once(
    tmp_path, db_url, make_settings, session_factory
):
    settings = make_settings(series={"quiet_seconds": 1})
    paths = synthetic_series(tmp_path / "src", 3, seed=21)
    acked = _store_then_die(tmp_path, db_url, paths)
    assert len(acked) == 3
    [assoc_id] = _open(session_factory, "crash-test")
    with session_factory() as session:
        gone = session.get(Receiver, "crash-test")
        assert gone is not None and gone.stopped_at is None
        beat_at = gone.heartbeat_at
        assert sorted(session.scalars(select(Instance.sop_instance_uid))) == sorted(acked)
    just_before = beat_at + timedelta(seconds=TIMEOUT - 1)
    just_after = beat_at + timedelta(seconds=TIMEOUT + 1)

    # Within the time-out: nothing is reaped, and the open association holds the series back.
    assert receivers.reap_dead_receivers(session_factory, TIMEOUT, now=just_before) == []
    assert sweep_complete_series(session_factory, settings, now=just_before + timedelta(hours=1)) == []
    assert _open(session_factory, "crash-test") == [assoc_id]

    reaped_before = _closed_metric("reaped")
    with capture_logs() as logs:
        [closed] = receivers.reap_dead_receivers(session_factory, TIMEOUT, now=just_after)
    assert _closed_metric("reaped") == reaped_before + 1
    assert (closed.association_id, closed.receiver_id, closed.instances, closed.series) == (
        assoc_id,
        "crash-test",
        3,
        1,
    )
    assert _open(session_factory, "crash-test") == []
    reaped = [e for e in logs if e["event"] == "association_reaped"]
    assert len(reaped) == 1 and reaped[0]["association_id"] == assoc_id
    assert not any(uid in json.dumps(logs, default=str) for uid in acked)
    [event] = _events(session_factory, audit.ASSOCIATION_CLOSED)
    assert (event.actor, event.outcome, event.reason, event.calling_ae_title) == (
        "reaper",
        "reaped",
        "receiver_timeout",
        "GONESCU",
    )
    assert event.detail["association_id"] == assoc_id and event.detail["receiver_id"] == "crash-test"
    assert sorted(event.detail["sop_instance_uid_hashes"]) == sorted(uid_hash(u) for u in acked)

    # A second reaper finds nothing; the series completes on what was acknowledged, exactly once.
    assert receivers.reap_dead_receivers(session_factory, TIMEOUT, now=just_after + timedelta(seconds=5)) == []
    with session_factory() as session:
        last_received = max(session.scalars(select(Series.last_received_at)))
    quiet_over = max(just_after, last_received) + timedelta(seconds=settings.series.quiet_seconds + 1)
    [series_id] = sweep_complete_series(session_factory, settings, now=quiet_over)
    assert sweep_complete_series(session_factory, settings, now=quiet_over + timedelta(days=1)) == []
    with session_factory() as session:
        series = session.get(Series, series_id)
        assert series is not None and (series.state, series.instance_count) == (SeriesState.QUEUED, 3)
    assert [(j.series_id, j.generation) for j in _infer_jobs(session_factory)] == [(series_id, 1)]
    assert len(_events(session_factory, audit.ASSOCIATION_CLOSED)) == 1


def test_a_fresh_heartbeat_protects_a_receivers_associations(session_factory):
    receivers.register(session_factory, "alive:TRIAGED:11112", host="alive", pid=1, now=T0)
    receivers.register(session_factory, "other:TRIAGED:11112", host="other", pid=2, now=T0)
    mine = _add_association(session_factory, "alive:TRIAGED:11112")
    theirs = _add_association(session_factory, "other:TRIAGED:11112")
    for seconds in (10, 50, 90):  # its beats keep coming; the other one's stopped after T0
        receivers.beat(session_factory, {"alive:TRIAGED:11112": 1}, now=T0 + timedelta(seconds=seconds))
    assert receivers.reap_dead_receivers(session_factory, TIMEOUT, now=T0 + timedelta(seconds=TIMEOUT)) == []
    [closed] = receivers.reap_dead_receivers(session_factory, TIMEOUT, now=T0 + timedelta(seconds=140))
    assert closed.association_id == theirs
    assert _open(session_factory, "alive:TRIAGED:11112") == [mine]
    # Once its beats stop too, it goes the same way: strictly older than the time-out.
    assert receivers.reap_dead_receivers(session_factory, TIMEOUT, now=T0 + timedelta(seconds=150)) == []
    [closed] = receivers.reap_dead_receivers(session_factory, TIMEOUT, now=T0 + timedelta(seconds=150.001))
    assert closed.association_id == mine


def test_a_receiver_registers_at_start_and_records_its_clean_stop(make_settings, session_factory):
    settings = receiver_settings(make_settings)
    with running_receiver(settings, session_factory) as receiver:
        [receiver_id] = receiver.receiver_ids
        with session_factory() as session:
            row = session.get(Receiver, receiver_id)
            assert row is not None and row.stopped_at is None and row.heartbeat_at == row.started_at
        receiver.heartbeat()
        with session_factory() as session:
            row = session.get(Receiver, receiver_id)
            assert row is not None and row.heartbeat_at > row.started_at
    with session_factory() as session:
        row = session.get(Receiver, receiver_id)
        assert row is not None and row.stopped_at is not None
        [info] = receivers.list_receivers(session, timeout_seconds=TIMEOUT)
    assert (info.id, info.state, info.open_associations) == (receiver_id, "stopped", 0)


def test_forget_refuses_a_live_receiver_and_names_an_unknown_id(session_factory):
    receivers.register(session_factory, "live:TRIAGED:1", now=T0)
    assoc_id = _add_association(session_factory, "live:TRIAGED:1")
    with pytest.raises(receivers.ReceiverAliveError, match="--force"):
        receivers.forget(session_factory, "live:TRIAGED:1", timeout_seconds=TIMEOUT, now=T0 + timedelta(seconds=5))
    with pytest.raises(NotFoundError, match="nope"):
        receivers.forget(session_factory, "nope", timeout_seconds=TIMEOUT, now=T0)
    assert _open(session_factory, "live:TRIAGED:1") == [assoc_id]
    assert _events(session_factory, audit.ADMIN_ACTION) == []
    forgotten_before = _closed_metric("forgotten")
    [closed] = receivers.forget(
        session_factory, "live:TRIAGED:1", timeout_seconds=TIMEOUT, force=True, actor="alice", now=T0
    )
    assert closed.association_id == assoc_id
    assert _closed_metric("forgotten") == forgotten_before + 1
    [action] = _events(session_factory, audit.ADMIN_ACTION)
    assert (action.actor, action.reason, action.detail) == (
        "alice",
        "receivers_forget",
        {"receiver_id": "live:TRIAGED:1", "closed": [assoc_id], "forced": True},
    )
    # A receiver forgotten while alive comes back with its next beat.
    receivers.beat(session_factory, {"live:TRIAGED:1": 7}, host="h", now=T0 + timedelta(seconds=1))
    with session_factory() as session:
        [info] = receivers.list_receivers(session, timeout_seconds=TIMEOUT, now=T0 + timedelta(seconds=2))
    assert (info.id, info.host, info.pid, info.state) == ("live:TRIAGED:1", "h", 7, "alive")


def _config(tmp_path: Path, db_url: str) -> Path:
    config = tmp_path / "triaged.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "cli"}"\nlog_level = "warning"\n[database]\nurl = "{db_url}"\n'
        "[dicom]\nheartbeat_seconds = 10\nreceiver_timeout_seconds = 60\n"
    )
    return config


def test_receivers_list_and_forget_from_the_cli(tmp_path, db_url, session_factory):
    now = datetime.now(UTC)
    receivers.register(session_factory, "up:TRIAGED:11112", host="up", pid=11, now=now)
    receivers.register(session_factory, "down:TRIAGED:11112", host="down", pid=12, now=now - timedelta(hours=1))
    up_assoc = _add_association(session_factory, "up:TRIAGED:11112", opened_at=now)
    down_assocs = [_add_association(session_factory, "down:TRIAGED:11112") for _ in range(2)]
    legacy = _add_association(session_factory, "legacy:TRIAGED:104")  # open, written before receivers had rows
    config = _config(tmp_path, db_url)

    listed = runner.invoke(app, ["--config", str(config), "receivers", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    by_id = {r["id"]: r for r in json.loads(listed.stdout)}
    assert {k: (r["state"], r["open_associations"], r["host"]) for k, r in by_id.items()} == {
        "down:TRIAGED:11112": ("dead", 2, "down"),
        "legacy:TRIAGED:104": ("unknown", 1, ""),
        "up:TRIAGED:11112": ("alive", 1, "up"),
    }
    assert by_id["legacy:TRIAGED:104"]["heartbeat_at"] is None
    table = runner.invoke(app, ["--config", str(config), "receivers", "list"])
    assert table.exit_code == 0 and "LAST HEARTBEAT" in table.output and "never" in table.output

    refused = runner.invoke(app, ["--config", str(config), "receivers", "forget", "up:TRIAGED:11112"])
    assert refused.exit_code == 1 and "is alive" in refused.output and "--force" in refused.output
    assert "Traceback" not in refused.output
    unknown = runner.invoke(app, ["--config", str(config), "receivers", "forget", "nosuch:TRIAGED:1"])
    assert unknown.exit_code == 1 and "no receiver 'nosuch:TRIAGED:1'" in unknown.output
    assert "Traceback" not in unknown.output
    assert _open(session_factory, "up:TRIAGED:11112") == [up_assoc]

    forgot = runner.invoke(app, ["--config", str(config), "receivers", "forget", "down:TRIAGED:11112", "--json"])
    assert forgot.exit_code == 0, forgot.output
    assert [c["association_id"] for c in json.loads(forgot.stdout)["closed"]] == down_assocs
    legacy_forgot = runner.invoke(app, ["--config", str(config), "receivers", "forget", "legacy:TRIAGED:104"])
    assert legacy_forgot.exit_code == 0 and "closed 1 open association" in legacy_forgot.output
    forced = runner.invoke(app, ["--config", str(config), "receivers", "forget", "up:TRIAGED:11112", "--force"])
    assert forced.exit_code == 0, forced.output
    assert _open(session_factory, "up:TRIAGED:11112") == []

    actions = _events(session_factory, audit.ADMIN_ACTION)
    assert [(e.actor, e.detail["receiver_id"], e.detail["forced"]) for e in actions] == [
        (audit.os_user(), "down:TRIAGED:11112", False),
        (audit.os_user(), "legacy:TRIAGED:104", False),
        (audit.os_user(), "up:TRIAGED:11112", True),
    ]
    closed = _events(session_factory, audit.ASSOCIATION_CLOSED)
    assert [(e.detail["association_id"], e.outcome, e.actor) for e in closed] == [
        *((a, "forgotten", audit.os_user()) for a in down_assocs),
        (legacy, "forgotten", audit.os_user()),
        (up_assoc, "forgotten", audit.os_user()),
    ]
    empty = runner.invoke(app, ["--config", str(config), "receivers", "list", "--json"])
    assert empty.exit_code == 0 and json.loads(empty.stdout) == []


def test_the_timeout_must_cover_two_heartbeats(make_settings):
    with pytest.raises(ConfigError, match="receiver_timeout_seconds"):
        make_settings(dicom={"heartbeat_seconds": 10, "receiver_timeout_seconds": 15})
    settings: Settings = make_settings(dicom={"heartbeat_seconds": 1, "receiver_timeout_seconds": 2})
    assert settings.dicom.receiver_timeout_seconds == 2


def _series_states(session_factory) -> list[SeriesState]:
    with session_factory() as session:
        return list(session.scalars(select(Series.state)))


def _heartbeat_moved(session_factory, receiver_id: str) -> bool:
    with session_factory() as session:
        row = session.get(Receiver, receiver_id)
        return row is not None and row.heartbeat_at > row.started_at


@pytest.mark.slow
def test_a_killed_serve_is_reaped_by_another_serve_and_its_series_queued(tmp_path, db_url):
    """Real processes: `triaged serve` (receive only) beats its heartbeat, stores 3 instances on an association and
    is SIGKILLed; a second `triaged serve` (another receiver) reaps that association once the heartbeat is older
    than the (short) time-out, and its sweep queues the series once."""
    common: dict[str, object] = {
        "model_dir": tmp_path / "no-model",  # worker.count = 0: no model is loaded
        "peers": {"pacs": {"ae_title": "GONESCU", "host": "127.0.0.1", "port": 9}},
        "quiet_seconds": 0.5,
        "worker": {"count": 0, "lease_seconds": 4},
        "dicom": {"heartbeat_seconds": 0.5, "receiver_timeout_seconds": 3},
        "database_url": db_url,  # one database for both (SQLite file or PostgreSQL schema)
    }
    doomed = TriagedDaemon(root=tmp_path / "a", **common)  # type: ignore[arg-type]
    doomed.start()
    doomed_id = default_receiver_id("TRIAGED", doomed.dicom_port)
    engine = make_engine(db_url)  # the test's own connections, disposed at its end
    factory = make_session_factory(engine)
    try:
        try:
            wait_for(lambda: _heartbeat_moved(factory, doomed_id), timeout=30)  # the daemon's scheduler beats
            assert doomed.process is not None
            paths = synthetic_series(tmp_path / "src", 3, seed=5)
            acked = _store_then_kill(doomed.process, doomed.dicom_port, paths)
        finally:
            doomed.stop()
        assert len(acked) == 3
        assert len(_open(factory, doomed_id)) == 1
        assert _series_states(factory) == [SeriesState.RECEIVING]

        rescuer = TriagedDaemon(root=tmp_path / "b", **common)  # type: ignore[arg-type]
        rescuer.start()
        try:
            wait_for(lambda: _series_states(factory) == [SeriesState.QUEUED], timeout=60)
            listed = rescuer.cli("receivers", "list", "--json")
        finally:
            rescuer.stop()
        assert _open(factory, doomed_id) == []
        assert len(_infer_jobs(factory)) == 1
        [event] = _events(factory, audit.ASSOCIATION_CLOSED)
        assert (event.actor, event.detail["receiver_id"], event.detail["stored"]) == ("reaper", doomed_id, 3)
    finally:
        engine.dispose()
    assert listed.returncode == 0, listed.stderr
    states = {r["id"]: (r["state"], r["open_associations"]) for r in json.loads(listed.stdout)}
    assert states[doomed_id] == ("dead", 0)
    assert states[default_receiver_id("TRIAGED", rescuer.dicom_port)] == ("alive", 0)


def test_a_pool_registers_each_process_and_its_parent_beats_for_them(make_settings, sqlite_url, tmp_path):
    """Each child registers its own ``<base>:<index>`` (an earlier, larger pool's rows go); the parent beats for
    all of them (the daemon's scheduler calls it) and each child records its clean stop."""
    engine = make_engine(sqlite_url)
    upgrade(engine)
    session_factory = make_session_factory(engine)
    receivers.register(session_factory, "pool-test:7", now=T0)  # a process of an earlier run with more of them
    settings = receiver_settings(make_settings, dicom={"receiver_processes": 2}, database={"url": sqlite_url})
    pool = ReceiverPool(settings, session_factory, receiver_id="pool-test", port=0, stop_timeout=5)
    pool.start()
    try:
        assert pool.receiver_ids == ["pool-test:0", "pool-test:1"]
        with session_factory() as session:
            rows = {r.id: r for r in session.scalars(select(Receiver))}
        assert sorted(rows) == ["pool-test:0", "pool-test:1"]
        assert sorted(r.pid for r in rows.values()) == sorted(pool.pids)
        pool.heartbeat()
        with session_factory() as session:
            beaten = {r.id: r for r in session.scalars(select(Receiver))}
        assert all(beaten[k].heartbeat_at > rows[k].heartbeat_at for k in rows)
        assert {k: r.pid for k, r in beaten.items()} == {k: r.pid for k, r in rows.items()}
    finally:
        pool.stop()
    with session_factory() as session:
        assert all(r.stopped_at is not None for r in session.scalars(select(Receiver)))
    engine.dispose()


def test_a_restart_closes_what_its_predecessor_left_open_and_counts_it(session_factory):
    own = _add_association(session_factory, "host:TRIAGED:11112")
    pool_child = _add_association(session_factory, "host:TRIAGED:11112:2")
    other = _add_association(session_factory, "other:TRIAGED:11112")
    before = _closed_metric("restarted")
    assert close_stale_associations(session_factory, "host:TRIAGED:11112") == 2
    assert _closed_metric("restarted") == before + 2
    assert _open(session_factory, "host:TRIAGED:11112") == [] and _open(session_factory, "host:TRIAGED:11112:2") == []
    assert _open(session_factory, "other:TRIAGED:11112") == [other]
    closed = _events(session_factory, audit.ASSOCIATION_CLOSED)
    assert sorted(e.detail["association_id"] for e in closed) == sorted([own, pool_child])
    assert {e.outcome for e in closed} == {"restarted"}
