"""The console: server-rendered pages (Jinja2) over the same queries as the API; no JavaScript needed.

Pages: the worklist (urgent first, then newest), one series (slice-score strip, the Secondary Captures as
the PACS received them, results, outputs and their delivery), the queue and dead letters, destinations,
the model card; admins also get reprocess/resend/retry buttons, which post to routes calling the API's
(and so the CLI's) functions. Logging in is a form; failed attempts are rate-limited and logged without
the attempted password.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlencode

import structlog
from fastapi import APIRouter, Depends, Form, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from markdown_it import MarkdownIt

from triaged import __version__
from triaged.db import queries, users
from triaged.db.models import JobState, SeriesState, UserRole
from triaged.errors import ModelError, NotFoundError
from triaged.web import api
from triaged.web.auth import (
    SESSION_COOKIE,
    Principal,
    clear_session_cookie,
    page_user,
    set_session_cookie,
)
from triaged.web.context import WebContext, web_context
from triaged.web.modelinfo import FIGURE_DIR, figure_path, read_card, read_model_info
from triaged.web.passwords import dummy_verify, verify_password
from triaged.web.strip import slice_strip

log = structlog.get_logger()

TEMPLATES = Jinja2Templates(directory=Path(__file__).with_name("templates"))
PAGE_SIZE = 50

router = APIRouter(include_in_schema=False)
Context = Annotated[WebContext, Depends(web_context)]
Viewer = Annotated[Principal, Depends(page_user)]


def _ago(value: datetime | None) -> str:
    if value is None:
        return "–"
    seconds = (datetime.now(UTC) - value).total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return f"{max(seconds, 0):.0f} s ago"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


TEMPLATES.env.filters["ago"] = _ago
TEMPLATES.env.filters["duration"] = _duration
TEMPLATES.env.filters["short_uid"] = lambda uid: uid if len(uid) <= 20 else f"…{uid[-18:]}"
TEMPLATES.env.globals["version"] = __version__


def _render(request: Request, name: str, user: Principal | None, status_code: int = 200, **values: Any) -> Response:
    return TEMPLATES.TemplateResponse(request, name, {"user": user, **values}, status_code=status_code)


def _safe_next(value: str | None) -> str:
    """Only same-site paths: a login link must never bounce to another site."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    return value


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: str = "/") -> Response:
    return _render(request, "login.html", None, next=_safe_next(next), error=None)


@router.post("/login")
def login(
    request: Request,
    context: Context,
    name: Annotated[str, Form(max_length=64)],
    password: Annotated[str, Form(max_length=1024)],
    next: Annotated[str, Form()] = "/",
) -> Response:
    client = request.client.host if request.client else "unknown"
    keys = (f"client:{client}", f"user:{name}")
    wait = max(context.limiter.retry_after(key) for key in keys)
    if wait > 0:
        log.warning("login_rate_limited", user=name, client=client, retry_after=round(wait))
        return _render(
            request,
            "login.html",
            None,
            status_code=429,
            next=_safe_next(next),
            error=f"Too many failed logins. Try again in {wait:.0f} s.",
        )
    with context.session() as session:
        user = users.user_by_name(session, name)
        if user is None:
            dummy_verify(password)
        ok = user is not None and not user.disabled and verify_password(user.password_hash, password)
        token = users.create_session(session, user, _lifetime(context)) if ok and user is not None else None
    if token is None:
        failures = max(context.limiter.failed(key) for key in keys)
        log.warning("login_failed", user=name, client=client, failures=failures)  # never the password
        return _render(
            request, "login.html", None, status_code=401, next=_safe_next(next), error="Wrong name or password."
        )
    for key in keys:
        context.limiter.succeeded(key)
    log.info("login", user=name, client=client)
    response = RedirectResponse(_safe_next(next), status_code=303)
    set_session_cookie(response, context.settings, token)
    return response


def _lifetime(context: WebContext) -> timedelta:
    return timedelta(hours=context.settings.http.session_hours)


@router.post("/logout")
def logout(request: Request, context: Context) -> Response:
    token = request.cookies.get(SESSION_COOKIE)
    if token:
        with context.session() as session:
            users.end_session(session, token)
    response = RedirectResponse("/login", status_code=303)
    clear_session_cookie(response, context.settings)
    return response


@router.get("/", response_class=HTMLResponse)
def worklist(
    *,
    request: Request,
    context: Context,
    user: Viewer,
    state: Annotated[str, Query(max_length=16)] = "",
    urgent: Annotated[str, Query(max_length=8)] = "",
    page: Annotated[int, Query(ge=1, le=100_000)] = 1,
) -> Response:
    """The filter form sends empty values for "any": parse them here rather than answering 422."""
    chosen_state = SeriesState(state) if state in set(SeriesState) else None
    chosen_urgent = {"true": True, "false": False}.get(urgent)
    with context.session() as session:
        listing = queries.list_series(
            session, state=chosen_state, urgent=chosen_urgent, offset=(page - 1) * PAGE_SIZE, limit=PAGE_SIZE
        )
        accession = {row.id: api.series_identifiers(context, row.id, session).accession_number for row in listing.items}
    filters = {k: v for k, v in (("state", state), ("urgent", urgent)) if v}
    more = listing.total > page * PAGE_SIZE
    return _render(
        request,
        "worklist.html",
        user,
        listing=listing,
        accession=accession,
        state=chosen_state,
        urgent=chosen_urgent,
        states=list(SeriesState),
        page=page,
        prev_url=f"/?{urlencode({**filters, 'page': page - 1})}" if page > 1 else None,
        next_url=f"/?{urlencode({**filters, 'page': page + 1})}" if more else None,
    )


@router.get("/series/{series_instance_uid}", response_class=HTMLResponse)
def series_page(
    request: Request, context: Context, user: Viewer, series_instance_uid: str, notice: str | None = None
) -> Response:
    try:
        record = api.get_series(context, user, series_instance_uid)
    except HTTPException:
        return _render(request, "not_found.html", user, status_code=404, what=series_instance_uid)
    latest = record.results[-1] if record.results else None
    strip = slice_strip(latest.slices, latest.threshold) if latest and latest.slices else None
    images = [o for o in latest.outputs if o.kind == "sc"] if latest else []
    return _render(
        request,
        "series.html",
        user,
        s=record,
        latest=latest,
        strip=strip,
        images=images,
        show_patient=context.settings.http.show_patient_identifiers,
        notice=notice,
        quote=quote,
    )


@router.post("/series/{series_instance_uid}/{action}")
def series_action(request: Request, context: Context, user: Viewer, series_instance_uid: str, action: str) -> Response:
    if user.role != UserRole.ADMIN:
        raise HTTPException(403, "this action needs the admin role")
    handlers = {"reprocess": api.reprocess, "resend": api.resend}
    if action not in handlers:
        raise HTTPException(404, "unknown action")
    result = handlers[action](context, user, series_instance_uid)
    notice = f"{action}: {result.detail}" + (f" (job {', '.join(map(str, result.job_ids))})" if result.job_ids else "")
    target = f"/series/{quote(series_instance_uid)}?{urlencode({'notice': notice})}"
    return RedirectResponse(target, status_code=303)


@router.get("/queue", response_class=HTMLResponse)
def queue_page(request: Request, context: Context, user: Viewer, notice: str | None = None) -> Response:
    with context.session() as session:
        active = queries.list_jobs(session, states=(JobState.QUEUED, JobState.RUNNING), limit=200)
        dead = queries.list_jobs(session, states=(JobState.DEAD, JobState.FAILED), limit=200)
        recent = queries.list_jobs(session, states=(JobState.DONE,), limit=20)
    return _render(request, "queue.html", user, active=active, dead=dead, recent=recent, notice=notice)


@router.post("/jobs/{job_id}/retry")
def retry_job(request: Request, context: Context, user: Viewer, job_id: api.JobId) -> Response:
    if user.role != UserRole.ADMIN:
        raise HTTPException(403, "this action needs the admin role")
    result = api.retry(context, user, job_id)
    return RedirectResponse(f"/queue?{urlencode({'notice': f'job {job_id}: {result.detail}'})}", status_code=303)


@router.get("/destinations", response_class=HTMLResponse)
def destinations_page(request: Request, context: Context, user: Viewer) -> Response:
    with context.session() as session:
        rows = queries.list_destinations(session)
    return _render(request, "destinations.html", user, destinations=rows)


@router.get("/receivers", response_class=HTMLResponse)
def receivers_page(request: Request, context: Context, user: Viewer) -> Response:
    timeout = context.settings.dicom.receiver_timeout_seconds
    return _render(request, "receivers.html", user, receivers=api.receiver_views(context), timeout=timeout)


@router.get("/model", response_class=HTMLResponse)
def model_page(request: Request, context: Context, user: Viewer) -> Response:
    model_dir = context.settings.model.directory
    try:
        info = read_model_info(model_dir)
    except ModelError as exc:
        return _render(request, "model.html", user, info=None, error=str(exc), card=None, figures=[])
    try:
        card = MarkdownIt("commonmark", {"html": False}).enable("table").render(read_card(model_dir))
    except NotFoundError:
        card = None
    figures = sorted(p.name for p in (model_dir / FIGURE_DIR).glob("*.png"))
    return _render(request, "model.html", user, info=info, error=None, card=card, figures=figures)


@router.get("/model/figures/{name}")
def model_figure(context: Context, user: Viewer, name: str) -> Response:
    try:
        return FileResponse(figure_path(context.settings.model.directory, name), media_type="image/png")
    except NotFoundError as exc:
        raise HTTPException(404, str(exc)) from exc
