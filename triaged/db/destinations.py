"""The destinations table: one circuit breaker per destination, shared by every worker process (design: Delivery).

State machine::

    up --connection refused / timeout / association rejected--> down (its export jobs wait, spending nothing)
    down --probe fails--> down (probes + 1, next probe after backoff)
    down --probe answers--> up, on trial (its export jobs are claimable again, urgent first, oldest first)
    up, on trial --a delivery is confirmed--> up
    up, on trial --no answer again--> down, and this time the job spends its attempt

The trial ends the flapping of a peer that answers the probe but not a send (C-ECHO accepted, every storage
association rejected or aborted): without it, such a job would wait without cost until ``outputs.max_age_hours``.

Every function is one short write (or read) in the caller's transaction or its own; the network work (sending,
probing) happens outside, in :mod:`triaged.outputs.destinations`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from triaged.db.models import (
    ACTIVE_JOB_STATES,
    URGENT_EXPORT_PRIORITY,
    DestinationState,
    DestinationStatus,
    Job,
    JobKind,
    utcnow,
)

_ERROR_MAX_CHARS = 2000


def _row(session: Session, name: str, now: datetime) -> DestinationStatus:
    row = session.get(DestinationStatus, name)
    if row is None:
        row = DestinationStatus(name=name, state=DestinationState.UP, probes=0, updated_at=now)
        session.add(row)
        session.flush()
    return row


def prepare_export(session: Session, job_id: int, name: str, now: datetime | None = None) -> DestinationState:
    """Record which destination job ``job_id`` sends to (so claims can skip it while down); return its state."""
    now = now or utcnow()
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.destination.is_distinct_from(name))
        .values(destination=name)
        .execution_options(synchronize_session=False)
    )
    return DestinationState(_row(session, name, now).state)


def on_trial(session: Session, name: str) -> bool:
    """Whether ``name`` came up on a probe's word and nothing was delivered to it since."""
    return bool(session.scalar(select(DestinationStatus.trial).where(DestinationStatus.name == name)))


def confirm_delivery(session: Session, name: str) -> None:
    """A delivery to ``name`` was confirmed: its trial, if any, is over (one conditional write)."""
    session.execute(
        update(DestinationStatus)
        .where(DestinationStatus.name == name, DestinationStatus.trial.is_(True))
        .values(trial=False)
        .execution_options(synchronize_session=False)
    )


def mark_down(
    session: Session, name: str, error: str, *, first_probe_after: timedelta, now: datetime | None = None
) -> bool:
    """Mark ``name`` down (True when it was up: the caller logs the transition once); ends any trial."""
    now = now or utcnow()
    row = _row(session, name, now)
    row.last_error = error[:_ERROR_MAX_CHARS]
    row.updated_at = now
    row.trial = False
    if row.state == DestinationState.DOWN:
        return False
    row.state = DestinationState.DOWN
    row.down_since = now
    row.probes = 0
    row.next_probe_at = now + first_probe_after
    return True


def mark_up(session: Session, name: str, now: datetime | None = None) -> DestinationStatus | None:
    """Mark ``name`` up; return a detached copy of the row as it was when it was down (None if it was up)."""
    now = now or utcnow()
    row = _row(session, name, now)
    if row.state == DestinationState.UP:
        return None
    before = DestinationStatus(
        name=row.name,
        state=row.state,
        down_since=row.down_since,
        last_error=row.last_error,
        probes=row.probes,
        trial=False,
        next_probe_at=row.next_probe_at,
        last_probe_at=now,
        updated_at=row.updated_at,
    )
    row.state = DestinationState.UP
    row.trial = True
    row.down_since = None
    row.next_probe_at = None
    row.last_probe_at = now
    row.updated_at = now
    return before


def probe_failed(
    session: Session, name: str, error: str, *, next_probe_after: timedelta, now: datetime | None = None
) -> int:
    """Count a failed probe of a down destination and schedule the next one; return the number of probes."""
    now = now or utcnow()
    row = _row(session, name, now)
    row.probes += 1
    row.last_error = error[:_ERROR_MAX_CHARS]
    row.last_probe_at = now
    row.next_probe_at = now + next_probe_after
    row.updated_at = now
    return int(row.probes)


def due_for_probe(session: Session, now: datetime | None = None) -> list[tuple[str, int]]:
    """``(name, probes so far)`` of down destinations whose next probe is due."""
    now = now or utcnow()
    query = (
        select(DestinationStatus.name, DestinationStatus.probes)
        .where(DestinationStatus.state == DestinationState.DOWN, DestinationStatus.next_probe_at <= now)
        .order_by(DestinationStatus.name)
    )
    return [(str(name), int(probes)) for name, probes in session.execute(query)]


@dataclass(frozen=True)
class DestinationSummary:
    """What `/metrics` and `jobs list` say about one destination."""

    name: str
    state: DestinationState
    down_since: datetime | None
    probes: int
    pending_exports: int
    oldest_pending_urgent: datetime | None


def summaries(session: Session) -> list[DestinationSummary]:
    """Every known destination with its pending export jobs and the creation time of its oldest urgent one."""
    active = (Job.kind == JobKind.EXPORT, Job.state.in_(ACTIVE_JOB_STATES), Job.destination.is_not(None))
    counted = session.execute(select(Job.destination, func.count()).where(*active).group_by(Job.destination))
    pending = {str(name): int(n) for name, n in counted}
    urgent = session.execute(
        select(Job.destination, func.min(Job.created_at))
        .where(*active, Job.priority >= URGENT_EXPORT_PRIORITY)
        .group_by(Job.destination)
    )
    oldest: dict[str, datetime | None] = {str(name): created for name, created in urgent}
    rows = session.scalars(select(DestinationStatus).order_by(DestinationStatus.name))
    return [
        DestinationSummary(
            name=row.name,
            state=DestinationState(row.state),
            down_since=row.down_since,
            probes=row.probes,
            pending_exports=int(pending.get(row.name, 0)),
            oldest_pending_urgent=_aware(oldest.get(row.name)),
        )
        for row in rows
    ]


def _aware(value: datetime | None) -> datetime | None:
    """``min()`` over a UTCDateTime column comes back untyped (naive on SQLite): make it UTC again."""
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
