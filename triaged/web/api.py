"""The versioned JSON API (`/api/v1`): the same query functions as the CLI, and the same admin actions.

Reads need any account; reprocess, retry and resend need the admin role and call exactly what
`triaged reprocess`, `triaged retry` and `triaged resend` call. Every response has a declared schema
(FastAPI writes it into ``/api/v1/openapi.json``), errors included.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Depends, HTTPException, Path, Query, Response
from pydantic import BaseModel, ConfigDict
from sqlalchemy import select
from sqlalchemy.orm import Session

from triaged.db import audit, queries, queue, receivers, repo
from triaged.db.models import Job, JobKind, JobState, SeriesState
from triaged.db.views import DestinationView, JobPage, ReceiverView, SeriesDetail, SeriesPage
from triaged.errors import ModelError, NotFoundError
from triaged.resend import resend_series
from triaged.web.auth import Principal, api_admin, api_user
from triaged.web.context import WebContext, web_context
from triaged.web.identifiers import StudyIdentifiers, study_identifiers
from triaged.web.images import output_png
from triaged.web.modelinfo import ModelInfo, read_card, read_model_info

log = structlog.get_logger()


class ErrorBody(BaseModel):
    detail: str


ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "no valid session cookie or API token"},
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": ErrorBody, "description": "no such object"}}
ADMIN: dict[int | str, dict[str, Any]] = {403: {"model": ErrorBody, "description": "needs the admin role"}}

router = APIRouter(prefix="/api/v1", responses=ERRORS, tags=["api"])

Context = Annotated[WebContext, Depends(web_context)]
User = Annotated[Principal, Depends(api_user)]
Admin = Annotated[Principal, Depends(api_admin)]
JobId = Annotated[int, Path(ge=1, le=2**62)]


class SeriesRecord(SeriesDetail):
    """One series (see :class:`~triaged.db.views.SeriesDetail`) and its study identifiers."""

    identifiers: StudyIdentifiers


class ActionResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    action: str
    job_ids: list[int]
    detail: str


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def series_identifiers(context: WebContext, series_id: int, session: Session) -> StudyIdentifiers:
    """Accession (and, if configured, patient) of a series, from one of its stored headers."""
    relative = queries.source_file(session, series_id)
    path = None
    if relative is not None:
        try:
            path = context.store.path_for(relative)
        except ValueError:  # a path that could escape the store: show nothing rather than read it
            path = None
    return study_identifiers(path, show_patient=context.settings.http.show_patient_identifiers)


@router.get("/series", response_model=SeriesPage, summary="The worklist: urgent first, then newest")
def list_series(
    *,
    context: Context,
    user: User,
    state: SeriesState | None = None,
    urgent: bool | None = None,
    received_from: Annotated[datetime | None, Query(description="last instance at or after (ISO 8601)")] = None,
    received_before: Annotated[datetime | None, Query(description="last instance before (ISO 8601)")] = None,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
    limit: Annotated[int, Query(ge=1, le=queries.MAX_PAGE)] = 50,
) -> SeriesPage:
    with context.session() as session:
        return queries.list_series(
            session,
            state=state,
            urgent=urgent,
            received_from=_utc(received_from),
            received_before=_utc(received_before),
            offset=offset,
            limit=limit,
        )


@router.get("/series/{series_instance_uid}", response_model=SeriesRecord, responses=NOT_FOUND)
def get_series(context: Context, user: User, series_instance_uid: str) -> SeriesRecord:
    """Instances, every result with its per-slice probabilities and not-assessable reason, outputs."""
    with context.session() as session:
        try:
            detail = queries.series_detail(session, series_instance_uid)
        except NotFoundError as exc:
            raise HTTPException(404, str(exc)) from exc
        identifiers = series_identifiers(context, detail.id, session)
    return SeriesRecord(**detail.model_dump(), identifiers=identifiers)


@router.get(
    "/outputs/{sop_instance_uid}/image.png",
    response_class=Response,
    responses={**NOT_FOUND, 200: {"content": {"image/png": {}}, "description": "the Secondary Capture as PNG"}},
)
def output_image(context: Context, user: User, sop_instance_uid: str) -> Response:
    """A Secondary Capture we built (and sent), rendered as PNG."""
    with context.session() as session:
        try:
            kind, relative = queries.output_file(session, sop_instance_uid)
        except NotFoundError as exc:
            raise HTTPException(404, str(exc)) from exc
    if kind != "sc":
        raise HTTPException(404, "only Secondary Captures have an image")
    try:
        png = output_png(context.store.path_for(relative))
    except (NotFoundError, ValueError) as exc:
        raise HTTPException(404, str(exc)) from exc
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


@router.get("/jobs", response_model=JobPage)
def list_jobs(
    *,
    context: Context,
    user: User,
    state: Annotated[list[JobState] | None, Query(description="one or more states")] = None,
    kind: JobKind | None = None,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
    limit: Annotated[int, Query(ge=1, le=queries.MAX_PAGE)] = 100,
) -> JobPage:
    """The queue, newest first; ``state=failed&state=dead`` are the dead letters, with their last error."""
    with context.session() as session:
        return queries.list_jobs(session, states=tuple(state or ()), kind=kind, offset=offset, limit=limit)


@router.get("/destinations", response_model=list[DestinationView])
def list_destinations(context: Context, user: User) -> list[DestinationView]:
    """Each destination's circuit breaker (up/down) and its pending exports."""
    with context.session() as session:
        return queries.list_destinations(session)


def receiver_views(context: WebContext) -> list[ReceiverView]:
    """What `triaged receivers list` shows, judged with this daemon's ``dicom.receiver_timeout_seconds``."""
    with context.session() as session:
        return receivers.list_receivers(session, timeout_seconds=context.settings.dicom.receiver_timeout_seconds)


@router.get("/receivers", response_model=list[ReceiverView])
def list_receivers(context: Context, user: User) -> list[ReceiverView]:
    """Every receiver process (one row per host and port, or per pool process) and its open associations."""
    return receiver_views(context)


@router.get("/model", response_model=ModelInfo, responses={503: {"model": ErrorBody}})
def model(context: Context, user: User) -> ModelInfo:
    try:
        return read_model_info(context.settings.model.directory)
    except ModelError as exc:
        raise HTTPException(503, str(exc)) from exc


@router.get(
    "/model/card",
    response_class=Response,
    responses={**NOT_FOUND, 200: {"content": {"text/markdown": {}}, "description": "MODEL_CARD.md"}},
)
def model_card(context: Context, user: User) -> Response:
    try:
        text = read_card(context.settings.model.directory)
    except NotFoundError as exc:
        raise HTTPException(404, str(exc)) from exc
    return Response(text, media_type="text/markdown; charset=utf-8")


@router.post("/series/{series_instance_uid}/reprocess", response_model=ActionResult, responses={**NOT_FOUND, **ADMIN})
def reprocess(context: Context, admin: Admin, series_instance_uid: str) -> ActionResult:
    """Queue the series again with the configured model (what `triaged reprocess UID` does)."""
    with context.session() as session:
        try:
            series = repo.series_by_uid(session, series_instance_uid)
        except NotFoundError as exc:
            raise HTTPException(404, str(exc)) from exc
        jobs = repo.reprocess_series(
            session, [series], model_dir=None, max_attempts=context.settings.worker.max_attempts
        )
        ids = [j.id for j in jobs]
        audit.record_admin_action(
            session, "reprocess", actor=admin.name, detail={"via": "web", "job_ids": ids, "series_ids": [series.id]}
        )
    log.info("web_action", action="reprocess", user=admin.name, jobs=ids)
    detail = "queued" if ids else "not queued: still receiving, already queued or received files purged"
    return ActionResult(action="reprocess", job_ids=ids, detail=detail)


@router.post("/series/{series_instance_uid}/resend", response_model=ActionResult, responses={**NOT_FOUND, **ADMIN})
def resend(context: Context, admin: Admin, series_instance_uid: str) -> ActionResult:
    """Send the latest outputs again, same SOP Instance UIDs (what `triaged resend UID` does)."""
    with context.session() as session:
        try:
            series = repo.series_by_uid(session, series_instance_uid)
        except NotFoundError as exc:
            raise HTTPException(404, str(exc)) from exc
        done = resend_series(session, [series], max_attempts=context.settings.worker.export_max_attempts)
        ids = [r.job_id for r in done if r.job_id is not None]
        audit.record_admin_action(
            session, "resend", actor=admin.name, detail={"via": "web", "job_ids": ids, "series_ids": [series.id]}
        )
    log.info("web_action", action="resend", user=admin.name, jobs=ids)
    detail = "queued" if ids else ("already queued" if done else "nothing to resend: no result yet")
    return ActionResult(action="resend", job_ids=ids, detail=detail)


@router.post("/jobs/{job_id}/retry", response_model=ActionResult, responses={**NOT_FOUND, **ADMIN})
def retry(context: Context, admin: Admin, job_id: JobId) -> ActionResult:
    """Put a dead or failed job back in the queue with fresh attempts (what `triaged retry ID` does)."""
    with context.session() as session:
        if session.scalar(select(Job.id).where(Job.id == job_id)) is None:
            raise HTTPException(404, f"unknown job id {job_id}")
        ids = queue.requeue(session, [job_id])
        audit.record_admin_action(
            session, "retry", actor=admin.name, detail={"via": "web", "requested": [job_id], "requeued": ids}
        )
    log.info("web_action", action="retry", user=admin.name, jobs=ids)
    return ActionResult(action="retry", job_ids=ids, detail="re-queued" if ids else "not dead or failed")
