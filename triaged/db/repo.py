"""Query and maintenance helpers over the pipeline tables (used by the daemon's housekeeping and the CLI)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Protocol

import structlog
from sqlalchemy import and_, exists, or_, select
from sqlalchemy.orm import Session, sessionmaker

from triaged.db import queue
from triaged.db.models import (
    ACTIVE_JOB_STATES,
    Instance,
    Job,
    JobKind,
    JobState,
    Series,
    SeriesState,
    Study,
    utcnow,
)
from triaged.errors import NotFoundError

log = structlog.get_logger()

PURGE_BATCH = 500
FINAL_SERIES_STATES = (SeriesState.DONE, SeriesState.FAILED, SeriesState.SKIPPED)
REPROCESS_PRIORITY = -10  # bulk reprocessing never delays newly received series


class _PathStore(Protocol):
    def path_for(self, relative: str) -> Path: ...


def purge_received_files(
    session_factory: sessionmaker[Session], store: _PathStore, older_than: datetime, *, max_batches: int = 20
) -> int:
    """Delete received files older than ``older_than`` of finished series (results and outputs are kept).

    Only series in a final state with no active job and no dead or failed export are touched: an export job
    may still need the source files to build its outputs, and `triaged resend --dead` may revive a dead one
    (conservative: it may already have built them). Each batch is one short transaction.
    """
    active = exists().where(
        Job.series_id == Instance.series_id,
        or_(
            Job.state.in_(ACTIVE_JOB_STATES),
            and_(Job.kind == JobKind.EXPORT, Job.state.in_((JobState.DEAD, JobState.FAILED))),
        ),
    )
    purged = 0
    for _ in range(max_batches):
        with session_factory.begin() as session:
            rows = session.scalars(
                select(Instance)
                .join(Series, Series.id == Instance.series_id)
                .where(
                    Instance.purged_at.is_(None),
                    Instance.received_at < older_than,
                    Series.state.in_(FINAL_SERIES_STATES),
                    ~active,
                )
                .limit(PURGE_BATCH)
            ).all()
            now = utcnow()
            for instance in rows:
                path = store.path_for(instance.file_path)
                try:
                    path.unlink(missing_ok=True)
                except OSError as exc:
                    log.warning("purge_unlink_failed", instance_id=instance.id, error=queue.error_line(exc))
                    continue
                instance.purged_at = now
                purged += 1
        if len(rows) < PURGE_BATCH:
            break
    if purged:
        log.info("received_files_purged", count=purged, older_than=older_than.isoformat())
    return purged


def series_by_uid(session: Session, series_instance_uid: str) -> Series:
    series = session.scalar(select(Series).where(Series.series_instance_uid == series_instance_uid))
    if series is None:
        raise NotFoundError(f"unknown series {series_instance_uid}")
    return series


def series_of_study(session: Session, study_instance_uid: str) -> list[Series]:
    study = session.scalar(select(Study).where(Study.study_instance_uid == study_instance_uid))
    if study is None:
        raise NotFoundError(f"unknown study {study_instance_uid}")
    return list(session.scalars(select(Series).where(Series.study_id == study.id).order_by(Series.id)))


def series_with_purged_files(session: Session, series_ids: Sequence[int]) -> set[int]:
    """Series (of ``series_ids``) that cannot be reprocessed because retention purged their files."""
    if not series_ids:
        return set()
    query = select(Instance.series_id).where(Instance.series_id.in_(series_ids), Instance.purged_at.is_not(None))
    return set(session.scalars(query.distinct()))


def enqueue_reprocess(
    session: Session,
    series: Sequence[Series],
    *,
    model_dir: str | None,
    max_attempts: int,
    priority: int = 0,
) -> list[Job]:
    """Queue an infer job per series for its current generation (a new result when the model differs).

    The pipeline is idempotent per (series, generation, model sha256): reprocessing with the same model
    completes without a second result; with another model it adds a result and keeps the old one.
    """
    jobs: list[Job] = []
    tag = model_dir or "default"
    for item in series:
        job = queue.enqueue(
            session,
            JobKind.INFER,
            dedupe_key=f"reprocess:{item.id}:{item.generation}:{tag}"[:200],
            series_id=item.id,
            generation=item.generation,
            payload={"model_dir": model_dir} if model_dir else {},
            priority=priority,
            max_attempts=max_attempts,
        )
        if job is not None:
            item.state = SeriesState.QUEUED
            item.skip_reason = None
            jobs.append(job)
    return jobs


def reprocess_series(
    session: Session, selected: Sequence[Series], *, model_dir: str | None, max_attempts: int
) -> list[Job]:
    """`triaged reprocess` and the API's reprocess: queue the selected series that can be processed again.

    A series still receiving, or one whose received files retention purged, is left out (the caller counts
    them as skipped). Bulk reprocessing runs below newly received series (:data:`REPROCESS_PRIORITY`).
    """
    purged = series_with_purged_files(session, [s.id for s in selected])
    eligible = [s for s in selected if s.state != SeriesState.RECEIVING and s.id not in purged]
    return enqueue_reprocess(
        session, eligible, model_dir=model_dir, max_attempts=max_attempts, priority=REPROCESS_PRIORITY
    )


def mark_series_failed(session_factory: sessionmaker[Session], job: Job, error: BaseException) -> None:
    """An infer job ended ``failed``/``dead``: the series is `failed` with the one-line reason.

    Only when the series is still at the job's generation (a re-opened series belongs to a newer job).
    """
    if job.series_id is None:
        return
    with session_factory.begin() as session:
        series = session.get(Series, job.series_id)
        if series is not None and series.generation == (job.generation or series.generation):
            series.state = SeriesState.FAILED
            series.skip_reason = queue.error_line(error)


def dead_job_ids(session: Session, kind: JobKind | None = None) -> list[int]:
    query = select(Job.id).where(Job.state == JobState.DEAD).order_by(Job.id)
    if kind is not None:
        query = query.where(Job.kind == kind)
    return list(session.scalars(query))
