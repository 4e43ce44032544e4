"""Receiver liveness (the ``receivers`` table) and the associations of receivers that are gone.

Series completion waits until every association that sent to a series is closed (style P6). A receiver
closes its own associations when they end and, after a crash, when it starts again under the same id
(:func:`triaged.receive.associations.close_stale_associations`). A receiver host that never comes back would
hold its series forever, so every receiver process keeps a row here with a heartbeat
(``dicom.heartbeat_seconds``), and the reaper that every ``serve`` and ``worker`` runs closes the open
associations of a receiver whose heartbeat is older than ``dicom.receiver_timeout_seconds``. Its series then
complete on the instances it acknowledged: those are durable (file fsynced, row committed) before 0x0000.

Each association closed this way gets one ``association_closed`` audit record and one log event
(``association_reaped`` or ``association_forgotten``), in the transaction that closes it. Timestamps are
compared across hosts, as the job leases are: hosts keep their clocks in sync (NTP) and the time-out is far
larger than their skew.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

import structlog
from sqlalchemy import Table, delete, exists, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session, sessionmaker

from triaged import metrics
from triaged.db import audit
from triaged.db.models import Association, Instance, Receiver, SeriesAssociation, utcnow
from triaged.db.views import ReceiverState, ReceiverView
from triaged.errors import NotFoundError, TriagedError
from triaged.log import uid_hash

log = structlog.get_logger()

RECEIVERS: Table = Receiver.__table__  # type: ignore[assignment]
ASSOCIATIONS: Table = Association.__table__  # type: ignore[assignment]

REAPER_ACTOR = "reaper"
FORGET_ACTION = "receivers_forget"


class ReceiverAliveError(TriagedError):
    """The receiver's heartbeat is fresh: closing its associations would complete series it is still receiving."""


@dataclass(frozen=True)
class ClosedAssociation:
    """One association closed for a receiver that is gone (what its audit record names)."""

    association_id: int
    receiver_id: str
    calling_ae_title: str
    peer_address: str
    instances: int
    series: int


def _upsert(session: Session, values: dict[str, Any], on_conflict: dict[str, Any]) -> None:
    dialect = session.get_bind().dialect.name
    insert = pg_insert if dialect == "postgresql" else sqlite_insert
    statement = insert(RECEIVERS).values(**values)
    session.execute(statement.on_conflict_do_update(index_elements=[RECEIVERS.c.id], set_=on_conflict))


def register(
    session_factory: sessionmaker[Session],
    receiver_id: str,
    *,
    host: str | None = None,
    pid: int | None = None,
    now: datetime | None = None,
) -> None:
    """A receiver started listening under ``receiver_id``: (re)write its row, alive from ``now``."""
    now = now or utcnow()
    values = {
        "id": receiver_id,
        "host": (host if host is not None else socket.gethostname())[:255],
        "pid": os.getpid() if pid is None else pid,
        "started_at": now,
        "heartbeat_at": now,
        "stopped_at": None,
    }
    with session_factory.begin() as session:
        _upsert(session, values, {k: v for k, v in values.items() if k != "id"})


def beat(
    session_factory: sessionmaker[Session],
    pids: Mapping[str, int | None],
    *,
    host: str | None = None,
    now: datetime | None = None,
) -> None:
    """Heartbeat of the receivers ``pids`` names (receiver id → process id), in one transaction.

    A row that is missing (``receivers forget --force`` of a live receiver) is written again, so a live
    receiver never stays invisible to ``receivers list`` or unprotected from the reaper.
    """
    if not pids:
        return
    now = now or utcnow()
    name = (host if host is not None else socket.gethostname())[:255]
    with session_factory.begin() as session:
        for receiver_id, pid in sorted(pids.items()):  # one lock order for every writer
            values = {"id": receiver_id, "host": name, "pid": pid, "started_at": now, "heartbeat_at": now}
            _upsert(session, values, {"heartbeat_at": now})


def mark_stopped(
    session_factory: sessionmaker[Session], receiver_ids: Iterable[str], *, now: datetime | None = None
) -> None:
    """A clean stop: the receiver closed its associations and will not beat again."""
    ids = sorted(receiver_ids)
    if not ids:
        return
    with session_factory.begin() as session:
        session.execute(update(RECEIVERS).where(RECEIVERS.c.id.in_(ids)).values(stopped_at=now or utcnow()))


def _is_alive(stopped_at: datetime | None, heartbeat_at: datetime | None, cutoff: datetime) -> bool:
    return stopped_at is None and heartbeat_at is not None and heartbeat_at >= cutoff


def _has_open_association() -> Any:
    return exists().where(ASSOCIATIONS.c.receiver_id == RECEIVERS.c.id, ASSOCIATIONS.c.closed_at.is_(None))


def close_open_associations(
    session: Session, receiver_id: str, *, now: datetime, outcome: str, reason: str, actor: str
) -> list[ClosedAssociation]:
    """Close every open association of ``receiver_id``, one audit record each (a concurrent close wins)."""
    rows = session.execute(
        select(ASSOCIATIONS.c.id, ASSOCIATIONS.c.calling_ae_title, ASSOCIATIONS.c.peer_address)
        .where(ASSOCIATIONS.c.receiver_id == receiver_id, ASSOCIATIONS.c.closed_at.is_(None))
        .order_by(ASSOCIATIONS.c.id)
    ).all()
    closed: list[ClosedAssociation] = []
    for row in rows:
        result = cast(
            CursorResult[Any],
            session.execute(
                update(ASSOCIATIONS)
                .where(ASSOCIATIONS.c.id == row.id, ASSOCIATIONS.c.closed_at.is_(None))
                .values(closed_at=now)
            ),
        )
        if result.rowcount != 1:
            continue
        uids = list(
            session.scalars(
                select(Instance.sop_instance_uid).where(Instance.association_id == row.id).order_by(Instance.id)
            )
        )
        series = int(
            session.scalar(
                select(func.count()).select_from(SeriesAssociation).where(SeriesAssociation.association_id == row.id)
            )
            or 0
        )
        audit.record_association_closed(
            session,
            association_id=row.id,
            receiver_id=receiver_id,
            peer_address=row.peer_address,
            calling_ae_title=row.calling_ae_title,
            instance_hashes=[uid_hash(uid) for uid in uids],
            series=series,
            outcome=outcome,
            reason=reason,
            actor=actor,
            now=now,
        )
        closed.append(ClosedAssociation(row.id, receiver_id, row.calling_ae_title, row.peer_address, len(uids), series))
    return closed


def count_closed(outcome: str, closed: int) -> None:
    """The metric for associations closed for a gone receiver; called once their transaction committed."""
    if closed:
        metrics.ASSOCIATIONS_CLOSED_FOR_GONE_RECEIVER.labels(outcome=outcome).inc(closed)


def _log_closed(outcome: str, closed: list[ClosedAssociation], **fields: Any) -> None:
    """Count and log associations closed with ``outcome`` (their audit outcome, the metric's label and the log
    event ``association_<outcome>``: one value, so the three never disagree)."""
    count_closed(outcome, len(closed))
    for item in closed:
        log.warning(
            f"association_{outcome}",
            association_id=item.association_id,
            receiver_id=item.receiver_id,
            calling_ae=item.calling_ae_title,
            instances=item.instances,
            series=item.series,
            **fields,
        )


def reap_dead_receivers(
    session_factory: sessionmaker[Session], timeout_seconds: float, *, now: datetime | None = None
) -> list[ClosedAssociation]:
    """Close the open associations of every receiver whose heartbeat is older than ``timeout_seconds``.

    One short transaction per dead receiver. Its row is locked and its heartbeat checked again inside it
    (PostgreSQL ``FOR UPDATE SKIP LOCKED``; SQLite's single writer), so a heartbeat that lands meanwhile
    wins, and two reapers never close (or audit) one association twice. The row stays: ``receivers list``
    shows the receiver as dead until it starts again or is forgotten.
    """
    now = now or utcnow()
    cutoff = now - timedelta(seconds=timeout_seconds)
    with session_factory() as session:
        candidates = list(
            session.scalars(
                select(RECEIVERS.c.id)
                .where(RECEIVERS.c.heartbeat_at < cutoff, _has_open_association())
                .order_by(RECEIVERS.c.id)
            )
        )
    closed: list[ClosedAssociation] = []
    for receiver_id in candidates:
        with session_factory.begin() as session:
            query = select(RECEIVERS.c.heartbeat_at).where(
                RECEIVERS.c.id == receiver_id, RECEIVERS.c.heartbeat_at < cutoff
            )
            if session.get_bind().dialect.name == "postgresql":
                query = query.with_for_update(skip_locked=True)
            heartbeat_at = session.scalar(query)
            if heartbeat_at is None:  # it beat meanwhile, or another reaper holds it
                continue
            reaped = close_open_associations(
                session, receiver_id, now=now, outcome="reaped", reason="receiver_timeout", actor=REAPER_ACTOR
            )
        _log_closed(
            "reaped",
            reaped,
            heartbeat_age_seconds=round((now - heartbeat_at).total_seconds(), 1),
            timeout_seconds=timeout_seconds,
        )
        closed.extend(reaped)
    return closed


def forget(
    session_factory: sessionmaker[Session],
    receiver_id: str,
    *,
    timeout_seconds: float,
    force: bool = False,
    actor: str | None = None,
    now: datetime | None = None,
) -> list[ClosedAssociation]:
    """Close ``receiver_id``'s open associations now and delete its row (``triaged receivers forget``).

    Raises :class:`~triaged.errors.NotFoundError` for an id with neither a row nor an open association, and
    :class:`ReceiverAliveError` when its heartbeat is fresh unless ``force``. The admin action is audited
    (``actor``, default the OS user) in the same transaction, with one ``association_closed`` record each.
    """
    now = now or utcnow()
    who = actor if actor is not None else audit.os_user()
    cutoff = now - timedelta(seconds=timeout_seconds)
    with session_factory.begin() as session:
        query = select(RECEIVERS.c.heartbeat_at, RECEIVERS.c.stopped_at).where(RECEIVERS.c.id == receiver_id)
        if session.get_bind().dialect.name == "postgresql":
            query = query.with_for_update()
        row = session.execute(query).first()
        open_count = session.scalar(
            select(func.count())
            .select_from(ASSOCIATIONS)
            .where(ASSOCIATIONS.c.receiver_id == receiver_id, ASSOCIATIONS.c.closed_at.is_(None))
        )
        if row is None and not open_count:
            raise NotFoundError(f"no receiver {receiver_id!r} (see `triaged receivers list`)")
        alive = row is not None and _is_alive(row.stopped_at, row.heartbeat_at, cutoff)
        if alive and not force:
            age = (now - row.heartbeat_at).total_seconds() if row is not None else 0.0
            raise ReceiverAliveError(
                f"receiver {receiver_id!r} is alive (heartbeat {age:.0f} s ago, time-out {timeout_seconds:g} s): "
                "its series are still arriving; use --force to close its associations anyway"
            )
        closed = close_open_associations(
            session, receiver_id, now=now, outcome="forgotten", reason="receiver_forgotten", actor=who
        )
        session.execute(delete(RECEIVERS).where(RECEIVERS.c.id == receiver_id))
        audit.record_admin_action(
            session,
            FORGET_ACTION,
            actor=who,
            detail={
                "receiver_id": receiver_id,
                "closed": [c.association_id for c in closed],
                "forced": alive,
            },
            now=now,
        )
    _log_closed("forgotten", closed, actor=who, forced=alive)
    return closed


def list_receivers(session: Session, *, timeout_seconds: float, now: datetime | None = None) -> list[ReceiverView]:
    """Every receiver with a row, and every receiver id that holds open associations without one, by id."""
    now = now or utcnow()
    cutoff = now - timedelta(seconds=timeout_seconds)
    open_counts: dict[str, int] = {
        receiver_id: int(n)
        for receiver_id, n in session.execute(
            select(ASSOCIATIONS.c.receiver_id, func.count())
            .where(ASSOCIATIONS.c.closed_at.is_(None))
            .group_by(ASSOCIATIONS.c.receiver_id)
        ).all()
    }
    infos: dict[str, ReceiverView] = {}
    for row in session.scalars(select(Receiver)):
        state: ReceiverState
        if row.stopped_at is not None:
            state = "stopped"
        else:
            state = "alive" if _is_alive(None, row.heartbeat_at, cutoff) else "dead"
        infos[row.id] = ReceiverView(
            id=row.id,
            host=row.host,
            pid=row.pid,
            started_at=row.started_at,
            heartbeat_at=row.heartbeat_at,
            stopped_at=row.stopped_at,
            open_associations=open_counts.get(row.id, 0),
            state=state,
        )
    for receiver_id, n in open_counts.items():
        if receiver_id not in infos:  # written before receivers had rows, or by a test's stand-in receiver
            infos[receiver_id] = ReceiverView(
                id=receiver_id,
                host="",
                pid=None,
                started_at=None,
                heartbeat_at=None,
                stopped_at=None,
                open_associations=n,
                state="unknown",
            )
    return [infos[key] for key in sorted(infos)]
