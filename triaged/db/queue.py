"""The job queue on the `jobs` table (design: Queue). Owner: processing work; extend, don't fork.

State machine (style P7)::

    queued --claim--> running --complete--> done
                         |--fail(permanent)--> failed
                         |--fail(retryable)--> queued (run_after = now + backoff) | dead (attempts exhausted)
                         |--defer (destination down)--> queued, the attempt given back, not claimed while down
                         '--lease expired (reaper)--> queued | dead
    queued export older than outputs.max_age_hours --expire--> dead

A claim is one short write transaction: PostgreSQL ``SELECT … FOR UPDATE SKIP LOCKED``; SQLite's engine
issues ``BEGIN IMMEDIATE`` so the select-then-conditional-update runs under the single writer lock.
:func:`complete` runs inside the caller's transaction so results and job completion commit together.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any, cast

import structlog
from sqlalchemy import Executable, case, func, or_, select, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session, sessionmaker

from triaged.db import audit
from triaged.db.models import (
    ACTIVE_JOB_STATES,
    DestinationState,
    DestinationStatus,
    Job,
    JobKind,
    JobState,
    utcnow,
)
from triaged.errors import JobError, TriagedError

log = structlog.get_logger()

REAP_BATCH = 100
REAP_MAX_BATCHES = 10
_ERROR_MAX_CHARS = 2000


class LeaseLostError(JobError):
    """The job is no longer running under this worker's lease (it expired and was re-queued or finished)."""


def _rowcount(session: Session, statement: Executable) -> int:
    result = cast(CursorResult[Any], session.execute(statement))
    return int(result.rowcount)


def enqueue(
    session: Session,
    kind: JobKind,
    *,
    dedupe_key: str,
    series_id: int | None = None,
    generation: int | None = None,
    payload: dict[str, Any] | None = None,
    priority: int = 0,
    max_attempts: int = 5,
    run_after: datetime | None = None,
) -> Job | None:
    """Add a job in the caller's transaction unless an active one has the same ``dedupe_key``.

    Returns the new job, or ``None`` when an active duplicate exists (the partial unique index
    ``uq_jobs_active_dedupe_key`` is the real guard; this check only avoids the exception).
    """
    existing = session.scalar(select(Job.id).where(Job.dedupe_key == dedupe_key, Job.state.in_(ACTIVE_JOB_STATES)))
    if existing is not None:
        return None
    job = Job(
        kind=kind,
        state=JobState.QUEUED,
        dedupe_key=dedupe_key,
        series_id=series_id,
        generation=generation,
        payload=payload or {},
        priority=priority,
        max_attempts=max_attempts,
        run_after=run_after or utcnow(),
    )
    session.add(job)
    session.flush()
    return job


def claim(
    session_factory: sessionmaker[Session],
    *,
    worker_id: str,
    kinds: Sequence[JobKind],
    lease_seconds: float,
    now: datetime | None = None,
) -> Job | None:
    """Take the most urgent runnable job (highest priority, oldest ``run_after``) and lease it.

    Jobs whose destination is down are not runnable: they wait, in their order, until it answers again.
    Returns a detached :class:`Job` already in state ``running`` (attempts incremented), or ``None``.
    """
    if not kinds:
        return None
    now = now or utcnow()
    down = select(DestinationStatus.name).where(DestinationStatus.state == DestinationState.DOWN)
    with session_factory.begin() as session:
        query = (
            select(Job)
            .where(
                Job.state == JobState.QUEUED,
                Job.run_after <= now,
                Job.kind.in_(list(kinds)),
                or_(Job.destination.is_(None), Job.destination.not_in(down)),
            )
            .order_by(Job.priority.desc(), Job.run_after.asc(), Job.id.asc())
            .limit(1)
        )
        if session.get_bind().dialect.name == "postgresql":
            query = query.with_for_update(skip_locked=True)
        job = session.scalars(query).first()
        if job is None:
            return None
        # Conditional update: belt and braces on top of the row lock / writer lock.
        updated = _rowcount(
            session,
            update(Job)
            .where(Job.id == job.id, Job.state == JobState.QUEUED)
            .values(
                state=JobState.RUNNING,
                lease_owner=worker_id,
                lease_expires_at=now + timedelta(seconds=lease_seconds),
                heartbeat_at=now,
                attempts=Job.attempts + 1,
                updated_at=now,
            )
            .execution_options(synchronize_session=False),
        )
        if updated != 1:
            return None
        session.refresh(job)
        session.expunge(job)
    return job


def heartbeat(session_factory: sessionmaker[Session], job_id: int, worker_id: str, lease_seconds: float) -> bool:
    """Extend the lease; ``False`` when this worker no longer holds the job (stop and roll back)."""
    now = utcnow()
    with session_factory.begin() as session:
        result = _rowcount(
            session,
            update(Job)
            .where(Job.id == job_id, Job.state == JobState.RUNNING, Job.lease_owner == worker_id)
            .values(lease_expires_at=now + timedelta(seconds=lease_seconds), heartbeat_at=now, updated_at=now)
            .execution_options(synchronize_session=False),
        )
        return result == 1


def complete(session: Session, job_id: int, worker_id: str) -> None:
    """Mark the job done in the caller's transaction; raise :class:`LeaseLostError` if it is not ours.

    The caller must let the exception roll back its transaction, so a job whose lease was taken over
    never commits results twice.
    """
    now = utcnow()
    result = _rowcount(
        session,
        update(Job)
        .where(Job.id == job_id, Job.state == JobState.RUNNING, Job.lease_owner == worker_id)
        .values(state=JobState.DONE, finished_at=now, lease_expires_at=None, updated_at=now, last_error=None)
        .execution_options(synchronize_session=False),
    )
    if result != 1:
        raise LeaseLostError(f"job {job_id} is no longer leased by {worker_id}")


def error_line(error: BaseException) -> str:
    """One line ``ClassName: message`` for ``last_error`` (no tracebacks in the database)."""
    message = " ".join(str(error).split())
    text = f"{type(error).__name__}: {message}" if message else type(error).__name__
    return text[:_ERROR_MAX_CHARS]


def is_retryable(error: BaseException) -> bool:
    """Operational errors say so themselves; unknown exceptions are assumed transient."""
    if isinstance(error, TriagedError):
        return bool(error.retryable)
    return True


def backoff_seconds(attempts: int, base: float, maximum: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter: uniform(0, min(maximum, base * 2**(attempts-1)))."""
    ceiling = min(maximum, base * (2 ** max(0, attempts - 1)))
    return (rng or random).uniform(0.0, ceiling)


def fail(
    session_factory: sessionmaker[Session],
    job_id: int,
    worker_id: str,
    error: BaseException,
    *,
    backoff_base_seconds: float = 5.0,
    backoff_max_seconds: float = 3600.0,
    now: datetime | None = None,
    rng: random.Random | None = None,
) -> JobState:
    """Record a failed attempt and return the job's new state (``failed``, ``queued`` or ``dead``).

    Raises :class:`LeaseLostError` if the job is no longer running under ``worker_id``.
    """
    now = now or utcnow()
    with session_factory.begin() as session:
        query = select(Job).where(Job.id == job_id, Job.state == JobState.RUNNING, Job.lease_owner == worker_id)
        if session.get_bind().dialect.name == "postgresql":
            query = query.with_for_update()
        job = session.scalars(query).first()
        if job is None:
            raise LeaseLostError(f"job {job_id} is no longer leased by {worker_id}")
        retryable = is_retryable(error)
        retry_at = now
        if retryable and job.attempts < job.max_attempts:
            retry_at += timedelta(seconds=backoff_seconds(job.attempts, backoff_base_seconds, backoff_max_seconds, rng))
        _end_attempt(job, now=now, error=error_line(error), retryable=retryable, retry_at=retry_at)
        return JobState(job.state)


def _end_attempt(job: Job, *, now: datetime, error: str, retryable: bool, retry_at: datetime) -> None:
    """Close a running attempt: ``failed`` (permanent), ``dead`` (attempts used up) or ``queued`` at ``retry_at``."""
    job.last_error = error
    job.lease_expires_at = None
    job.updated_at = now
    if not retryable:
        job.state = JobState.FAILED
        job.finished_at = now
    elif job.attempts >= job.max_attempts:
        job.state = JobState.DEAD
        job.finished_at = now
    else:
        job.state = JobState.QUEUED
        job.lease_owner = None
        job.run_after = retry_at


def reap_expired_leases(
    session_factory: sessionmaker[Session], now: datetime | None = None, *, batch_size: int = REAP_BATCH
) -> int:
    """Re-queue running jobs whose lease expired (their worker died); ``dead`` when attempts ran out.

    Each batch is its own short transaction and the number of batches is bounded, so the reaper can
    neither hold the writer lock for long nor loop forever (procrastinate #1408/#1518).
    """
    now = now or utcnow()
    total = 0
    for _ in range(REAP_MAX_BATCHES):
        with session_factory.begin() as session:
            query = (
                select(Job)
                .where(Job.state == JobState.RUNNING, Job.lease_expires_at < now)
                .order_by(Job.id)
                .limit(batch_size)
            )
            if session.get_bind().dialect.name == "postgresql":
                query = query.with_for_update(skip_locked=True)
            jobs = list(session.scalars(query))
            for job in jobs:
                owner = job.lease_owner
                error = f"LeaseExpiredError: lease of {owner} expired"
                _end_attempt(job, now=now, error=error, retryable=True, retry_at=now)
                if job.kind == JobKind.EXPORT and job.state == JobState.DEAD:
                    audit.record_export_outcome(session, job.id, outcome="dead", reason="lease_expired")
                log.warning(
                    "job_lease_expired", job_id=job.id, kind=str(job.kind), worker=owner, new_state=str(job.state)
                )
        total += len(jobs)
        if len(jobs) < batch_size:
            break
    return total


def requeue(session: Session, job_ids: Iterable[int], *, now: datetime | None = None) -> list[int]:
    """Put finished ``dead``/``failed`` jobs back in the queue with fresh attempts (CLI retry/resend).

    A re-queued job starts a new life: ``created_at`` is reset, so ``outputs.max_age_hours`` counts again.
    Jobs with an active twin (same ``dedupe_key`` already queued/running) are left alone. Returns the ids
    actually re-queued, in the caller's transaction.
    """
    now = now or utcnow()
    requeued: list[int] = []
    for job in session.scalars(select(Job).where(Job.id.in_(list(job_ids))).order_by(Job.id)):
        if job.state not in (JobState.DEAD, JobState.FAILED):
            continue
        twin = session.scalar(
            select(Job.id).where(Job.dedupe_key == job.dedupe_key, Job.state.in_(ACTIVE_JOB_STATES), Job.id != job.id)
        )
        if twin is not None:
            continue
        job.state = JobState.QUEUED
        job.attempts = 0
        job.run_after = now
        job.lease_owner = None
        job.lease_expires_at = None
        job.finished_at = None
        job.created_at = now
        job.updated_at = now
        session.flush()
        requeued.append(job.id)
    return requeued


def defer(
    session: Session, job_id: int, worker_id: str, *, destination: str, error: str, spend_attempt: bool = False
) -> JobState:
    """Give a running job back to the queue, waiting for ``destination``; return its new state.

    In the caller's transaction (the one that marks the destination down). ``run_after`` is kept, so the
    jobs of a destination flow in their original order (urgent first, oldest first) once it is up again.
    The attempt is given back unless ``spend_attempt`` (the destination failed its trial after a probe): then a
    job whose attempts are used up is ``dead``. Raises :class:`LeaseLostError` if the job is no longer running
    under ``worker_id``.
    """
    now = utcnow()
    values: dict[str, Any] = {
        "state": JobState.QUEUED,
        "lease_owner": None,
        "lease_expires_at": None,
        "attempts": Job.attempts - 1,
        "destination": destination,
        "last_error": error[:_ERROR_MAX_CHARS],
        "updated_at": now,
    }
    if spend_attempt:  # the claim counted the attempt: keep it, and die when none are left
        used_up = Job.attempts >= Job.max_attempts
        values |= {
            "attempts": Job.attempts,
            "state": case((used_up, JobState.DEAD.value), else_=JobState.QUEUED.value),
            "finished_at": case((used_up, now), else_=None),
        }
    updated = _rowcount(
        session,
        update(Job)
        .where(Job.id == job_id, Job.state == JobState.RUNNING, Job.lease_owner == worker_id)
        .values(**values)
        .execution_options(synchronize_session=False),
    )
    if updated != 1:
        raise LeaseLostError(f"job {job_id} is no longer leased by {worker_id}")
    return JobState(session.scalar(select(Job.state).where(Job.id == job_id)))


def expire_old_exports(
    session_factory: sessionmaker[Session], max_age: timedelta, now: datetime | None = None
) -> list[Job]:
    """Queued export jobs created more than ``max_age`` ago become ``dead`` (returned, detached, for the event)."""
    now = now or utcnow()
    with session_factory.begin() as session:
        query = select(Job).where(
            Job.kind == JobKind.EXPORT, Job.state == JobState.QUEUED, Job.created_at < now - max_age
        )
        if session.get_bind().dialect.name == "postgresql":
            query = query.with_for_update(skip_locked=True)
        jobs = list(session.scalars(query.order_by(Job.id).limit(REAP_BATCH)))
        hours = max_age.total_seconds() / 3600
        for job in jobs:
            waited = f" (last error: {job.last_error})" if job.last_error else ""
            job.last_error = f"ExportExpiredError: not delivered within {hours:g} h{waited}"[:_ERROR_MAX_CHARS]
            job.state = JobState.DEAD
            job.finished_at = now
            job.updated_at = now
            audit.record_export_outcome(session, job.id, outcome="dead", reason="expired")
        session.flush()
        for job in jobs:
            session.expunge(job)
    return jobs


def release(session_factory: sessionmaker[Session], job_id: int, worker_id: str) -> bool:
    """Give a running job back without counting the attempt (graceful shutdown mid-job)."""
    now = utcnow()
    with session_factory.begin() as session:
        result = _rowcount(
            session,
            update(Job)
            .where(Job.id == job_id, Job.state == JobState.RUNNING, Job.lease_owner == worker_id)
            .values(
                state=JobState.QUEUED,
                lease_owner=None,
                lease_expires_at=None,
                run_after=now,
                attempts=func.max(Job.attempts - 1, 0)
                if session.get_bind().dialect.name == "sqlite"
                else func.greatest(Job.attempts - 1, 0),
                updated_at=now,
            )
            .execution_options(synchronize_session=False),
        )
        return result == 1


def counts_by_state(session_factory: sessionmaker[Session]) -> dict[tuple[str, str], int]:
    """``{(kind, state): n}`` for the jobs gauge and `jobs list` summaries."""
    with session_factory() as session:
        rows = session.execute(select(Job.kind, Job.state, func.count()).group_by(Job.kind, Job.state))
        return {(str(kind), str(state)): int(n) for kind, state, n in rows}
