"""Re-queue exports (`triaged resend`): a series or a study sends its latest outputs again; dead exports retry.

Resending a series clears ``sent_at`` on the latest result's outputs and queues an export job for it; the
objects keep their SOP Instance UIDs, so a PACS that already has them de-duplicates.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from triaged.db import queue
from triaged.db.models import Job, JobKind, JobState, Output, Result, Series, Study
from triaged.errors import NotFoundError


@dataclass(frozen=True)
class Requeued:
    series_instance_uid: str
    result_id: int
    job_id: int | None  # None: an export for this result was already queued or running


def _latest_result(session: Session, series_id: int) -> Result | None:
    return session.scalars(
        select(Result).where(Result.series_id == series_id).order_by(Result.generation.desc(), Result.id.desc())
    ).first()


def resend_series(session: Session, series_list: list[Series], *, max_attempts: int) -> list[Requeued]:
    """Queue one export per series for its latest result, in the caller's transaction."""
    done: list[Requeued] = []
    for series in series_list:
        result = _latest_result(session, series.id)
        if result is None:
            continue
        job = queue.enqueue(
            session,
            JobKind.EXPORT,
            dedupe_key=f"export:{result.id}",
            series_id=series.id,
            generation=result.generation,
            payload={"result_id": result.id, "resend": True},
            max_attempts=max_attempts,
        )
        if job is not None:
            session.execute(update(Output).where(Output.result_id == result.id).values(sent_at=None))
        done.append(Requeued(series.series_instance_uid, result.id, job.id if job is not None else None))
    return done


def series_by_uid(session: Session, series_instance_uid: str) -> list[Series]:
    series = session.scalar(select(Series).where(Series.series_instance_uid == series_instance_uid))
    if series is None:
        raise NotFoundError(f"no series with SeriesInstanceUID {series_instance_uid}")
    return [series]


def series_of_study(session: Session, study_instance_uid: str) -> list[Series]:
    study = session.scalar(select(Study).where(Study.study_instance_uid == study_instance_uid))
    if study is None:
        raise NotFoundError(f"no study with StudyInstanceUID {study_instance_uid}")
    return list(session.scalars(select(Series).where(Series.study_id == study.id).order_by(Series.id)))


def requeue_dead_exports(session: Session) -> list[int]:
    """Put every ``dead`` or ``failed`` export job back in the queue with fresh attempts."""
    ids = session.scalars(
        select(Job.id).where(Job.kind == JobKind.EXPORT, Job.state.in_((JobState.DEAD, JobState.FAILED)))
    ).all()
    return queue.requeue(session, ids)
