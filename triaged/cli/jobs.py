"""`triaged jobs list`, `results show`, `reprocess`, `retry`, `purge`: thin shells over db/queue and db/repo.

SQLAlchemy and the models are imported inside each command: `triaged --help` must not pay for them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from triaged.cli.common import echo_json, echo_table, fail, open_engine, settings_from
from triaged.db.states import JobKind, JobState, SeriesState
from triaged.errors import NotFoundError

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from triaged.config import Settings


@contextmanager
def _session(settings: Settings) -> Iterator[Session]:
    """A committed-on-success session whose engine is disposed afterwards (no pooled connection leaks)."""
    from triaged.db.engine import make_session_factory

    engine = open_engine(settings)
    try:
        with make_session_factory(engine).begin() as session:
            yield session
    finally:
        engine.dispose()


jobs_app = typer.Typer(help="The job queue.", no_args_is_help=True)
results_app = typer.Typer(help="Triage results.", no_args_is_help=True)

Json = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


@jobs_app.command("list")
def list_jobs(
    ctx: typer.Context,
    state: Annotated[JobState | None, typer.Option("--state", help="Only jobs in this state.")] = None,
    kind: Annotated[JobKind | None, typer.Option("--kind", help="Only jobs of this kind.")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many (newest first).")] = 100,
    as_json: Json = False,
) -> None:
    """List jobs, newest first."""
    from triaged.db import queries

    settings = settings_from(ctx)
    with _session(settings) as session:
        page = queries.list_jobs(session, states=(state,) if state else (), kind=kind, limit=limit)
    rows = [job.model_dump(mode="json") for job in page.items]
    if as_json:
        echo_json(rows)
        return
    echo_table(
        ["ID", "KIND", "STATE", "ATTEMPTS", "DESTINATION", "SERIES", "LAST ERROR"],
        [
            [
                str(r["id"]),
                r["kind"],
                r["state"],
                f"{r['attempts']}/{r['max_attempts']}",
                r["destination"] or "-",
                r["series_instance_uid"] or "-",
                (r["last_error"] or "")[:80],
            ]
            for r in rows
        ],
    )


@results_app.command("show")
def show_results(
    ctx: typer.Context,
    series_instance_uid: Annotated[str, typer.Argument(help="SeriesInstanceUID.")],
    as_json: Json = False,
) -> None:
    """Every result of one series (oldest first), with per-slice predictions."""
    from triaged.db import queries

    settings = settings_from(ctx)
    with _session(settings) as session:
        try:
            detail = queries.series_detail(session, series_instance_uid)
        except NotFoundError as exc:
            fail(str(exc))
    data: dict[str, Any] = {
        "series_instance_uid": detail.series_instance_uid,
        "state": detail.state,
        "generation": detail.generation,
        "skip_reason": detail.skip_reason,
        "results": [r.model_dump(mode="json") for r in detail.results],
    }
    if as_json:
        echo_json(data)
        return
    typer.echo(f"series {data['series_instance_uid']}: {data['state']} (generation {data['generation']})")
    if data["skip_reason"]:
        typer.echo(f"  reason: {data['skip_reason']}")
    rows = [
        [
            str(r["id"]),
            str(r["generation"]),
            f"{r['model_name']} {r['model_version']}",
            r["status"],
            r["label"] or "-",
            "-" if r["urgency"] is None else f"{r['urgency']:.3f}",
            "URGENT" if r["urgent"] else "",
            r["reason"] or "",
        ]
        for r in data["results"]
    ]
    echo_table(["ID", "GEN", "MODEL", "STATUS", "LABEL", "URGENCY", "FLAG", "REASON"], rows)


def _parse_since(value: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        fail(f"--since: not an ISO date/time: {value!r} (e.g. 2026-11-25 or 2026-11-25T10:00)")
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def reprocess(  # noqa: PLR0917 - Typer options
    ctx: typer.Context,
    uid: Annotated[str | None, typer.Argument(help="SeriesInstanceUID (StudyInstanceUID with --study).")] = None,
    study: Annotated[bool, typer.Option("--study", help="UID is a StudyInstanceUID: every series of it.")] = False,
    since: Annotated[str | None, typer.Option("--since", help="Series received since (ISO date/time, UTC).")] = None,
    failed: Annotated[bool, typer.Option("--failed", help="Series whose processing failed.")] = False,
    model: Annotated[
        Path | None, typer.Option("--model", help="Model directory to use instead of the configured one.")
    ] = None,
    as_json: Json = False,
) -> None:
    """Queue series for processing again (a new result if the model changed; the old one is kept)."""
    from sqlalchemy import select

    from triaged.db import audit, repo
    from triaged.db.models import Series

    if uid is None and since is None and not failed:
        fail("name a series UID, a study UID with --study, --since or --failed", 2)
    if study and uid is None:
        fail("--study needs a StudyInstanceUID", 2)
    model_dir: str | None = None
    if model is not None:
        if not (model / "model.json").is_file():
            fail(f"--model: {model} is not a model directory (no model.json)", 2)
        model_dir = str(model.resolve())
    cutoff = _parse_since(since) if since is not None else None
    settings = settings_from(ctx)
    with _session(settings) as session:
        selected: dict[int, Series] = {}
        try:
            if uid is not None:
                found = repo.series_of_study(session, uid) if study else [repo.series_by_uid(session, uid)]
                selected.update({s.id: s for s in found})
        except NotFoundError as exc:
            fail(str(exc))
        if cutoff is not None or failed:
            query = select(Series)
            if cutoff is not None:
                query = query.where(Series.last_received_at >= cutoff)
            if failed:
                query = query.where(Series.state == SeriesState.FAILED)
            if uid is not None:
                query = query.where(Series.id.in_(list(selected)))
                selected = {}
            selected.update({s.id: s for s in session.scalars(query)})
        jobs = repo.reprocess_series(
            session, list(selected.values()), model_dir=model_dir, max_attempts=settings.worker.max_attempts
        )
        queued = [{"job_id": j.id, "series_id": j.series_id, "generation": j.generation} for j in jobs]
        audit.record_admin_action(
            session,
            "reprocess",
            detail={
                "selected": len(selected),
                "job_ids": [j.id for j in jobs],
                "series_ids": [j.series_id for j in jobs],
                "study": study,
                "since": since,
                "failed": failed,
                "model_dir": model_dir,
            },
        )
    if as_json:
        echo_json({"queued": queued, "selected": len(selected)})
        return
    skipped = len(selected) - len(queued)
    typer.echo(
        f"queued {len(queued)} series for reprocessing"
        + (f" ({skipped} skipped: still receiving, already queued or received files purged)" if skipped else "")
    )


def retry(
    ctx: typer.Context,
    job_ids: Annotated[list[int] | None, typer.Argument(help="Job ids (dead or failed).")] = None,
    all_dead: Annotated[bool, typer.Option("--all", help="Every dead job.")] = False,
    as_json: Json = False,
) -> None:
    """Put dead (or explicitly named failed) jobs back in the queue with fresh attempts."""
    from sqlalchemy import select

    from triaged.db import audit, queue, repo
    from triaged.db.models import Job

    if not job_ids and not all_dead:
        fail("name job ids or use --all", 2)
    settings = settings_from(ctx)
    with _session(settings) as session:
        ids = list(job_ids or [])
        if ids:
            known = set(session.scalars(select(Job.id).where(Job.id.in_(ids))))
            missing = sorted(set(ids) - known)
            if missing:
                fail(f"unknown job id(s): {', '.join(map(str, missing))}")
        if all_dead:
            ids.extend(repo.dead_job_ids(session))
        requeued = queue.requeue(session, sorted(set(ids)))
        audit.record_admin_action(session, "retry", detail={"requested": sorted(set(ids)), "requeued": requeued})
    if as_json:
        echo_json({"requeued": requeued})
        return
    typer.echo(f"re-queued {len(requeued)} job(s)" + (f": {', '.join(map(str, requeued))}" if requeued else ""))


def purge(
    ctx: typer.Context,
    older_than_days: Annotated[float, typer.Option("--older-than-days", min=0, help="Age of received files.")],
    as_json: Json = False,
) -> None:
    """Delete received DICOM files of finished series older than N days; results and outputs are kept."""
    from triaged.db import audit, repo
    from triaged.db.engine import make_session_factory
    from triaged.db.models import utcnow
    from triaged.runtime import build_store

    settings = settings_from(ctx)
    engine = open_engine(settings)
    try:
        cutoff = utcnow() - timedelta(days=older_than_days)
        factory = make_session_factory(engine)
        count = repo.purge_received_files(factory, build_store(settings), cutoff)
        with factory.begin() as session:
            audit.record_admin_action(
                session, "purge", detail={"older_than_days": older_than_days, "purged_files": count}
            )
    finally:
        engine.dispose()
    if as_json:
        echo_json({"purged": count})
        return
    typer.echo(f"purged {count} received file(s)")


def register(app: typer.Typer) -> None:
    app.add_typer(jobs_app, name="jobs")
    app.add_typer(results_app, name="results")
    app.command("reprocess")(reprocess)
    app.command("retry")(retry)
    app.command("purge")(purge)
