"""The read queries behind `triaged series/jobs/results`, the JSON API and the console: one copy of each.

Every function takes an open session and returns :mod:`triaged.db.views` records, so the CLI's ``--json``,
the API's responses and the console's pages cannot drift apart.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session, selectinload

from triaged.db.destinations import summaries
from triaged.db.models import (
    DestinationStatus,
    Instance,
    Job,
    JobKind,
    JobState,
    Output,
    Result,
    ResultStatus,
    Series,
    SeriesState,
    Study,
)
from triaged.db.views import (
    DestinationView,
    InstanceGroup,
    JobPage,
    JobView,
    OutputView,
    ResultView,
    SeriesDetail,
    SeriesPage,
    SeriesSummary,
    SliceView,
)
from triaged.errors import NotFoundError

MAX_PAGE = 500


def _aware(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _latest_result_ids() -> Select[tuple[int, int]]:
    return select(Result.series_id, func.max(Result.id).label("result_id")).group_by(Result.series_id)


def _summary(series: Series, study_uid: str, result: Result | None) -> SeriesSummary:
    data: dict[str, object] = {
        "id": series.id,
        "series_instance_uid": series.series_instance_uid,
        "study_instance_uid": study_uid,
        "modality": series.modality,
        "state": str(series.state),
        "generation": series.generation,
        "instance_count": series.instance_count,
        "calling_ae_title": series.calling_ae_title,
        "skip_reason": series.skip_reason,
        "first_received_at": series.first_received_at,
        "last_received_at": series.last_received_at,
        "completed_at": series.completed_at,
    }
    if result is not None:
        elapsed = (result.created_at - series.last_received_at).total_seconds()
        data |= {
            "result_status": str(result.status),
            "label": result.label,
            "urgency": result.urgency,
            "threshold": result.threshold,
            "urgent": result.urgent,
            "not_assessable_reason": result.reason if result.status == ResultStatus.NOT_ASSESSABLE else None,
            "result_at": result.created_at,
            "seconds_to_result": max(elapsed, 0.0),
        }
    return SeriesSummary.model_validate(data)


def list_series(
    session: Session,
    *,
    state: SeriesState | None = None,
    urgent: bool | None = None,
    received_from: datetime | None = None,
    received_before: datetime | None = None,
    offset: int = 0,
    limit: int = 50,
) -> SeriesPage:
    """The worklist: urgent findings first, then the most recently received series (by last instance)."""
    latest = _latest_result_ids().subquery()
    query = (
        select(Series, Study.study_instance_uid, Result)
        .join(Study, Series.study_id == Study.id)
        .outerjoin(latest, latest.c.series_id == Series.id)
        .outerjoin(Result, Result.id == latest.c.result_id)
    )
    if state is not None:
        query = query.where(Series.state == state)
    if urgent is not None:
        flag = func.coalesce(Result.urgent, False)
        query = query.where(flag.is_(True) if urgent else flag.is_(False))
    if received_from is not None:
        query = query.where(Series.last_received_at >= received_from)
    if received_before is not None:
        query = query.where(Series.last_received_at < received_before)
    total = int(session.scalar(select(func.count()).select_from(query.subquery())) or 0)
    limit = max(1, min(limit, MAX_PAGE))
    ordered = query.order_by(
        func.coalesce(Result.urgent, False).desc(), Series.last_received_at.desc(), Series.id.desc()
    )
    rows = session.execute(ordered.offset(max(offset, 0)).limit(limit)).all()
    items = [_summary(series, study_uid, result) for series, study_uid, result in rows]
    return SeriesPage(total=total, offset=max(offset, 0), limit=limit, items=items)


def _job_view(job: Job, series_uid: str | None) -> JobView:
    return JobView(
        id=job.id,
        kind=str(job.kind),
        state=str(job.state),
        priority=job.priority,
        series_instance_uid=series_uid,
        generation=job.generation,
        attempts=job.attempts,
        max_attempts=job.max_attempts,
        destination=job.destination,
        run_after=job.run_after,
        lease_owner=job.lease_owner,
        last_error=job.last_error,
        created_at=job.created_at,
        finished_at=job.finished_at,
    )


def list_jobs(
    session: Session,
    *,
    states: tuple[JobState, ...] = (),
    kind: JobKind | None = None,
    offset: int = 0,
    limit: int = 100,
) -> JobPage:
    """Jobs newest first, optionally only in ``states`` and of one ``kind``."""
    query = select(Job, Series.series_instance_uid).outerjoin(Series, Series.id == Job.series_id)
    if states:
        query = query.where(Job.state.in_(states))
    if kind is not None:
        query = query.where(Job.kind == kind)
    total = int(session.scalar(select(func.count()).select_from(query.subquery())) or 0)
    limit = max(1, min(limit, MAX_PAGE))
    rows = session.execute(query.order_by(Job.id.desc()).offset(max(offset, 0)).limit(limit)).all()
    return JobPage(total=total, offset=max(offset, 0), limit=limit, items=[_job_view(j, uid) for j, uid in rows])


def _delivery(output: Output, export_state: JobState | None) -> str:
    if output.sent_at is not None:
        return "sent"
    if export_state in (JobState.QUEUED, JobState.RUNNING):
        return "pending"
    if export_state in (JobState.DEAD, JobState.FAILED):
        return str(export_state)
    return "not sent"


def _result_view(result: Result, export_state: JobState | None) -> ResultView:
    return ResultView(
        id=result.id,
        job_id=result.job_id,
        generation=result.generation,
        model=f"{result.model_name} {result.model_version}",
        model_name=result.model_name,
        model_version=result.model_version,
        model_sha256=result.model_sha256,
        status=str(result.status),
        reason=result.reason,
        label=result.label,
        probabilities=dict(result.probabilities or {}),
        urgency=result.urgency,
        threshold=result.threshold,
        urgent=result.urgent,
        ood_score=result.ood_score,
        timings=dict(result.timings or {}),
        created_at=result.created_at,
        slices=[
            SliceView(
                slice_index=s.slice_index,
                sop_instance_uid=s.sop_instance_uid,
                frame_number=s.frame_number,
                probabilities=list(s.probabilities),
                tumour_probability=s.tumour_probability,
                in_brain=s.in_brain,
                is_key=s.is_key,
                cam_path=s.cam_path,
            )
            for s in result.slice_predictions
        ],
        outputs=[
            OutputView(
                id=o.id,
                kind=str(o.kind),
                sop_class_uid=o.sop_class_uid,
                sop_instance_uid=o.sop_instance_uid,
                series_instance_uid=o.series_instance_uid,
                destination=o.destination,
                sent_at=o.sent_at,
                delivery=_delivery(o, export_state),
            )
            for o in sorted(result.outputs, key=lambda o: o.id)
        ],
    )


def series_detail(session: Session, series_instance_uid: str) -> SeriesDetail:
    """Everything about one series; :class:`NotFoundError` names the UID when there is no such series."""
    row = session.execute(
        select(Series, Study.study_instance_uid)
        .join(Study, Series.study_id == Study.id)
        .where(Series.series_instance_uid == series_instance_uid)
    ).one_or_none()
    if row is None:
        raise NotFoundError(f"no series with SeriesInstanceUID {series_instance_uid}")
    series, study_uid = row
    groups = session.execute(
        select(Instance.sop_class_uid, Instance.transfer_syntax_uid, func.count(), func.sum(Instance.size_bytes))
        .where(Instance.series_id == series.id)
        .group_by(Instance.sop_class_uid, Instance.transfer_syntax_uid)
    ).all()
    jobs = list(session.scalars(select(Job).where(Job.series_id == series.id).order_by(Job.id)))
    export_state: dict[int, JobState] = {}
    for job in jobs:  # oldest first: the newest export of a result decides its delivery state
        if job.kind == JobKind.EXPORT and isinstance(job.payload.get("result_id"), int):
            export_state[int(job.payload["result_id"])] = JobState(job.state)
    results = list(
        session.scalars(
            select(Result)
            .where(Result.series_id == series.id)
            .order_by(Result.id)
            .options(selectinload(Result.slice_predictions), selectinload(Result.outputs))
        )
    )
    summary = _summary(series, study_uid, results[-1] if results else None)
    return SeriesDetail(
        **summary.model_dump(),
        instances=[
            InstanceGroup(sop_class_uid=c, transfer_syntax_uid=t, count=int(n), bytes=int(b or 0))
            for c, t, n, b in groups
        ],
        jobs=[_job_view(j, series.series_instance_uid) for j in jobs],
        results=[_result_view(r, export_state.get(r.id)) for r in results],
    )


def output_file(session: Session, sop_instance_uid: str) -> tuple[str, str]:
    """``(kind, storage-relative path)`` of one output we built; :class:`NotFoundError` if unknown."""
    row = session.execute(
        select(Output.kind, Output.file_path).where(Output.sop_instance_uid == sop_instance_uid)
    ).one_or_none()
    if row is None:
        raise NotFoundError(f"no output with SOPInstanceUID {sop_instance_uid}")
    return str(row[0]), str(row[1])


def list_destinations(session: Session) -> list[DestinationView]:
    """Every destination the breaker knows, with its pending exports (see :mod:`triaged.db.destinations`)."""
    errors = dict(session.execute(select(DestinationStatus.name, DestinationStatus.last_error)).tuples().all())
    return [
        DestinationView(
            name=s.name,
            state=str(s.state),
            down_since=_aware(s.down_since),
            probes=s.probes,
            last_error=errors.get(s.name),
            pending_exports=s.pending_exports,
            oldest_pending_urgent=s.oldest_pending_urgent,
        )
        for s in summaries(session)
    ]


def source_file(session: Session, series_id: int) -> str | None:
    """Storage-relative path of one still-stored instance of the series (for its header), if any."""
    return session.scalar(
        select(Instance.file_path)
        .where(Instance.series_id == series_id, Instance.purged_at.is_(None))
        .order_by(Instance.id)
        .limit(1)
    )
