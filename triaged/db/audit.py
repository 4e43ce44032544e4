"""The audit trail (issue 12 item 8): who associated, what was stored, which admin acted — one row each.

Every record is a row in the append-only ``audit_events`` table and one structured log event
(``audit_event``), so a hospital's log collector or SIEM sees the same facts as ``triaged audit list``.
Nothing patient-identifying is recorded: peers by address and AE title, instances and series only by
:func:`~triaged.log.uid_hash`. Writers call one of the ``record_*`` functions inside their own
transaction, so an admin action and its audit row commit together or not at all.
"""

from __future__ import annotations

import getpass
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session

from triaged.db.models import AuditEvent, Job, Output, utcnow
from triaged.db.states import AuditKind
from triaged.log import uid_hash

log = structlog.get_logger()

ASSOCIATION_ACCEPTED = AuditKind.ASSOCIATION_ACCEPTED.value
ASSOCIATION_REJECTED = AuditKind.ASSOCIATION_REJECTED.value
INSTANCES_STORED = AuditKind.INSTANCES_STORED.value
ASSOCIATION_CLOSED = AuditKind.ASSOCIATION_CLOSED.value
ADMIN_ACTION = AuditKind.ADMIN_ACTION.value
EXPORT = AuditKind.EXPORT.value
KINDS = tuple(kind.value for kind in AuditKind)

#: At most this many instance hashes are kept in one ``instances_stored`` record (the count is exact).
MAX_HASHES = 10_000


def os_user() -> str:
    """The operating-system user running this process (who ran the CLI)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry and no LOGNAME/USER (some containers)
        return "unknown"


def _record(session: Session, event: AuditEvent) -> AuditEvent:
    session.add(event)
    log.info(
        "audit_event",
        kind=event.kind,
        actor=event.actor,
        peer=event.peer_address,
        calling_ae=event.calling_ae_title,
        called_ae=event.called_ae_title,
        outcome=event.outcome,
        reason=event.reason,
        **{f"detail_{k}": v for k, v in event.detail.items() if not isinstance(v, list | dict)},
    )
    return event


def record_association(
    session: Session,
    *,
    accepted: bool,
    peer_address: str,
    calling_ae_title: str,
    called_ae_title: str,
    reason: str | None = None,
    now: datetime | None = None,
) -> AuditEvent:
    """An association accepted, or rejected with its stable ``reason`` (as logged by the receiver)."""
    return _record(
        session,
        AuditEvent(
            at=now or utcnow(),
            kind=ASSOCIATION_ACCEPTED if accepted else ASSOCIATION_REJECTED,
            actor=calling_ae_title[:64],
            peer_address=peer_address[:64],
            calling_ae_title=calling_ae_title[:16],
            called_ae_title=called_ae_title[:16],
            outcome="accepted" if accepted else "rejected",
            reason=reason,
            detail={},
        ),
    )


def record_instances_stored(
    session: Session,
    *,
    association_id: int | None,
    peer_address: str,
    calling_ae_title: str,
    instance_hashes: Sequence[str],
    refused: int,
    now: datetime | None = None,
) -> AuditEvent:
    """What one association stored (hashed SOP Instance UIDs) and how many C-STOREs it was refused."""
    return _record(
        session,
        AuditEvent(
            at=now or utcnow(),
            kind=INSTANCES_STORED,
            actor=calling_ae_title[:64],
            peer_address=peer_address[:64],
            calling_ae_title=calling_ae_title[:16],
            outcome="ok" if not refused else "partial",
            detail={
                "association_id": association_id,
                "stored": len(instance_hashes),
                "refused": refused,
                "sop_instance_uid_hashes": list(instance_hashes[:MAX_HASHES]),
            },
        ),
    )


def record_association_closed(
    session: Session,
    *,
    association_id: int,
    receiver_id: str,
    peer_address: str,
    calling_ae_title: str,
    instance_hashes: Sequence[str],
    series: int,
    outcome: str,
    reason: str,
    actor: str,
    now: datetime | None = None,
) -> AuditEvent:
    """An association closed on behalf of a receiver that is gone: ``reaped`` (its heartbeat ran out),
    ``forgotten`` (``triaged receivers forget`` by ``actor``) or ``restarted`` (its receiver id started again after
    a crash). Its receiver cannot write the ``instances_stored`` record any more, so this one names what the
    association stored, from the rows (hashed UIDs only)."""
    return _record(
        session,
        AuditEvent(
            at=now or utcnow(),
            kind=ASSOCIATION_CLOSED,
            actor=actor[:64],
            peer_address=peer_address[:64],
            calling_ae_title=calling_ae_title[:16],
            outcome=outcome[:32],
            reason=reason[:64],
            detail={
                "association_id": association_id,
                "receiver_id": receiver_id,
                "stored": len(instance_hashes),
                "series": series,
                "sop_instance_uid_hashes": list(instance_hashes[:MAX_HASHES]),
            },
        ),
    )


def record_admin_action(
    session: Session,
    action: str,
    *,
    actor: str | None = None,
    outcome: str = "ok",
    detail: dict[str, Any] | None = None,
    now: datetime | None = None,
) -> AuditEvent:
    """An operator's action (``reprocess``, ``retry``, ``resend``, ``purge``, ...) by ``actor``.

    ``actor`` defaults to the OS user (the CLI); the web API passes its authenticated user. ``detail``
    holds ids and counts, and UIDs only through :func:`~triaged.log.uid_hash`.
    """
    if not action:
        raise ValueError("action must be named")
    return _record(
        session,
        AuditEvent(
            at=now or utcnow(),
            kind=ADMIN_ACTION,
            actor=(actor if actor is not None else os_user())[:64],
            outcome=outcome[:32],
            reason=action[:64],
            detail=dict(detail or {}),
        ),
    )


def record_export(
    session: Session,
    *,
    destination: str,
    job_id: int,
    result_id: int | None,
    sop_instance_uids: Sequence[str],
    outcome: str,
    reason: str | None = None,
    actor: str = "",
    delivered: int | None = None,
    now: datetime | None = None,
) -> AuditEvent:
    """An export job that ended: ``sent`` (every output delivered) or ``dead``/``failed`` (given up).

    ``sop_instance_uids`` are the outputs' raw UIDs: they are hashed here with :func:`~triaged.log.uid_hash`,
    as the receiver hashes what it stored, so an auditor can match an export to the objects a PACS holds.
    ``reason`` is a short stable word (``attempts``, ``permanent``), never a peer's free-text error.
    """
    return _record(
        session,
        AuditEvent(
            at=now or utcnow(),
            kind=EXPORT,
            actor=actor[:64],
            outcome=outcome[:32],
            reason=reason[:64] if reason else None,
            detail={
                "destination": destination,
                "job_id": job_id,
                "result_id": result_id,
                "objects": len(sop_instance_uids),
                "delivered": len(sop_instance_uids) if delivered is None else delivered,
                "sop_instance_uid_hashes": [uid_hash(uid) for uid in sop_instance_uids[:MAX_HASHES]],
            },
        ),
    )


def record_export_outcome(
    session: Session, job_id: int, *, outcome: str, reason: str | None = None, actor: str = ""
) -> AuditEvent | None:
    """Audit how export job ``job_id`` ended, from its rows: its destination and its outputs' UIDs.

    Called in the transaction that ends the job (``sent``) or right after the one that gave up on it
    (``dead``/``failed``). ``None`` for a job that is not an export of a result.
    """
    job = session.get(Job, job_id)
    if job is None:
        return None
    try:
        result_id: int | None = int(job.payload["result_id"])
    except (KeyError, TypeError, ValueError):
        result_id = None
    outputs = (
        list(session.scalars(select(Output).where(Output.result_id == result_id).order_by(Output.id)))
        if result_id is not None
        else []
    )
    delivered = [o for o in outputs if o.sent_at is not None]
    destination = job.destination or next((o.destination for o in outputs if o.destination), None) or ""
    return record_export(
        session,
        destination=destination,
        job_id=job_id,
        result_id=result_id,
        sop_instance_uids=[o.sop_instance_uid for o in outputs],
        outcome=outcome,
        reason=reason,
        actor=actor,
        delivered=len(delivered),
    )


def list_events(
    session: Session, *, since: datetime | None = None, kinds: Iterable[str] = (), limit: int = 100
) -> list[AuditEvent]:
    """Newest first: events at or after ``since``, of ``kinds`` (all when empty), at most ``limit``."""
    query = select(AuditEvent).order_by(AuditEvent.at.desc(), AuditEvent.id.desc()).limit(limit)
    if since is not None:
        query = query.where(AuditEvent.at >= since)
    chosen = list(kinds)
    if chosen:
        query = query.where(AuditEvent.kind.in_(chosen))
    return list(session.scalars(query))
