"""The job queue on the `jobs` table (design: Queue). Owner: processing work; extend, don't fork."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from triaged.db.models import ACTIVE_JOB_STATES, Job, JobKind, JobState, utcnow


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
