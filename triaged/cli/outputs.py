"""`triaged resend`: send a series' or a study's outputs to the PACS again, or retry dead exports."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from triaged.cli.common import echo_json, echo_table, fail, session_scope, settings_from
from triaged.errors import NotFoundError

if TYPE_CHECKING:  # triaged.resend needs SQLAlchemy: imported when the command runs, not for `--help`
    from triaged.resend import Requeued


def resend(
    ctx: typer.Context,
    series_instance_uid: Annotated[
        str | None, typer.Argument(help="SeriesInstanceUID of a processed series.", show_default=False)
    ] = None,
    study: Annotated[
        str | None, typer.Option("--study", help="Every processed series of this StudyInstanceUID.")
    ] = None,
    dead: Annotated[bool, typer.Option("--dead", help="Re-queue every dead or failed export job.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Queue the outputs of a series (or a study) to be sent again, with the same SOP Instance UIDs."""
    from triaged.db import audit
    from triaged.log import uid_hash
    from triaged.resend import requeue_dead_exports, resend_series, series_by_uid, series_of_study

    chosen = sum(x is not None and x is not False for x in (series_instance_uid, study, dead))
    if chosen != 1:
        fail("give exactly one of: a SeriesInstanceUID, --study UID, --dead", 2)
    settings = settings_from(ctx)
    requeued: list[Requeued] = []
    job_ids: list[int] = []
    with session_scope(settings) as session:
        try:
            if dead:
                job_ids = requeue_dead_exports(session)
            else:
                targets = (
                    series_by_uid(session, series_instance_uid)
                    if series_instance_uid is not None
                    else series_of_study(session, str(study))
                )
                requeued = resend_series(session, targets, max_attempts=settings.worker.export_max_attempts)
        except NotFoundError as exc:
            fail(str(exc))
        audit.record_admin_action(
            session,
            "resend",
            detail={
                "dead": dead,
                "series_uid_hash": uid_hash(series_instance_uid) if series_instance_uid else None,
                "study_uid_hash": uid_hash(study) if study else None,
                "job_ids": job_ids or [r.job_id for r in requeued if r.job_id],
            },
        )
    if dead:
        if as_json:
            echo_json({"requeued_job_ids": job_ids})
        else:
            typer.echo(
                f"re-queued {len(job_ids)} export job(s)" + (f": {', '.join(map(str, job_ids))}" if job_ids else "")
            )
        return
    if as_json:
        echo_json(
            [
                {"series_instance_uid": r.series_instance_uid, "result_id": r.result_id, "job_id": r.job_id}
                for r in requeued
            ]
        )
        return
    if not requeued:
        fail("nothing to resend: no result exists for that series/study yet")
    echo_table(
        ["SERIES", "RESULT", "EXPORT JOB"],
        [[r.series_instance_uid, str(r.result_id), str(r.job_id) if r.job_id else "already queued"] for r in requeued],
    )


def register(app: typer.Typer) -> None:
    app.command("resend")(resend)
