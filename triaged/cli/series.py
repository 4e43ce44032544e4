"""`triaged series list` and `triaged series show UID`: what was received and where each series stands."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any

import typer

from triaged.cli.common import echo_json, echo_table, fail, open_engine, settings_from
from triaged.db.states import SeriesState

if TYPE_CHECKING:  # SQLAlchemy is imported by the commands when they run, not by `triaged --help`
    from sqlalchemy.orm import Session

    from triaged.config import Settings
    from triaged.db.models import Series

app = typer.Typer(help="Received series.", no_args_is_help=True)

Json = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


@contextmanager
def _session(settings: Settings) -> Iterator[Session]:
    from triaged.db.engine import make_session_factory

    engine = open_engine(settings)
    try:
        with make_session_factory(engine)() as session:
            yield session
    finally:
        engine.dispose()


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _series_dict(series: Series, study_uid: str) -> dict[str, Any]:
    return {
        "id": series.id,
        "series_instance_uid": series.series_instance_uid,
        "study_instance_uid": study_uid,
        "modality": series.modality,
        "state": str(series.state),
        "generation": series.generation,
        "instance_count": series.instance_count,
        "calling_ae_title": series.calling_ae_title,
        "skip_reason": series.skip_reason,
        "first_received_at": _iso(series.first_received_at),
        "last_received_at": _iso(series.last_received_at),
        "completed_at": _iso(series.completed_at),
    }


@app.command("list")
def list_series(
    ctx: typer.Context,
    state: Annotated[
        SeriesState | None, typer.Option("--state", case_sensitive=False, help="Only series in this state.")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="Most recent N series.")] = 50,
    as_json: Json = False,
) -> None:
    """Most recently received series first."""
    from sqlalchemy import select

    from triaged.db.models import Series, Study

    settings = settings_from(ctx)
    query = select(Series, Study.study_instance_uid).join(Study, Series.study_id == Study.id)
    if state is not None:
        query = query.where(Series.state == state)
    query = query.order_by(Series.last_received_at.desc(), Series.id.desc()).limit(limit)
    with _session(settings) as session:
        data = [_series_dict(series, study_uid) for series, study_uid in session.execute(query).all()]
    if as_json:
        echo_json(data)
        return
    if not data:
        typer.echo("no series")
        return
    rows = [
        [
            str(s["id"]),
            s["state"],
            str(s["generation"]),
            s["modality"] or "-",
            str(s["instance_count"]),
            s["calling_ae_title"] or "-",
            (s["last_received_at"] or "")[:19],
            s["series_instance_uid"],
        ]
        for s in data
    ]
    echo_table(["ID", "STATE", "GEN", "MOD", "INST", "FROM", "LAST RECEIVED (UTC)", "SERIES INSTANCE UID"], rows)


def _show_data(session: Session, series_instance_uid: str) -> dict[str, Any] | None:
    from sqlalchemy import func, select

    from triaged.db.models import Instance, Job, Result, Series, Study

    row = session.execute(
        select(Series, Study.study_instance_uid)
        .join(Study, Series.study_id == Study.id)
        .where(Series.series_instance_uid == series_instance_uid)
    ).one_or_none()
    if row is None:
        return None
    series, study_uid = row
    data = _series_dict(series, study_uid)
    by_syntax = session.execute(
        select(Instance.sop_class_uid, Instance.transfer_syntax_uid, func.count(), func.sum(Instance.size_bytes))
        .where(Instance.series_id == series.id)
        .group_by(Instance.sop_class_uid, Instance.transfer_syntax_uid)
    ).all()
    data["instances"] = [
        {"sop_class_uid": c, "transfer_syntax_uid": t, "count": int(n), "bytes": int(b or 0)}
        for c, t, n, b in by_syntax
    ]
    jobs = session.scalars(select(Job).where(Job.series_id == series.id).order_by(Job.id)).all()
    data["jobs"] = [
        {
            "id": j.id,
            "kind": str(j.kind),
            "state": str(j.state),
            "generation": j.generation,
            "attempts": j.attempts,
            "last_error": j.last_error,
        }
        for j in jobs
    ]
    results = session.scalars(select(Result).where(Result.series_id == series.id).order_by(Result.id)).all()
    data["results"] = [
        {
            "id": r.id,
            "generation": r.generation,
            "label": r.label,
            "urgency": r.urgency,
            "urgent": r.urgent,
            "model": f"{r.model_name} {r.model_version}",
            "status": str(r.status),
            "reason": r.reason,
            "created_at": _iso(r.created_at),
        }
        for r in results
    ]
    return data


@app.command("show")
def show_series(
    ctx: typer.Context,
    series_instance_uid: Annotated[str, typer.Argument(help="SeriesInstanceUID.")],
    as_json: Json = False,
) -> None:
    """One series: state, instances by SOP class and transfer syntax, jobs and results."""
    settings = settings_from(ctx)
    with _session(settings) as session:
        data = _show_data(session, series_instance_uid.strip())
    if data is None:
        fail(f"no series with SeriesInstanceUID {series_instance_uid}")
    if as_json:
        echo_json(data)
        return
    typer.echo(f"series     {data['series_instance_uid']}")
    typer.echo(f"study      {data['study_instance_uid']}")
    typer.echo(
        f"state      {data['state']} (generation {data['generation']}), modality {data['modality'] or '-'}, "
        f"{data['instance_count']} instance(s) from {data['calling_ae_title'] or '-'}"
    )
    if data["skip_reason"]:
        typer.echo(f"skipped    {data['skip_reason']}")
    typer.echo(f"received   {data['first_received_at']} .. {data['last_received_at']}")
    typer.echo(f"completed  {data['completed_at'] or '-'}")
    typer.echo("")
    echo_table(
        ["SOP CLASS", "TRANSFER SYNTAX", "COUNT", "BYTES"],
        [[i["sop_class_uid"], i["transfer_syntax_uid"], str(i["count"]), str(i["bytes"])] for i in data["instances"]],
    )
    typer.echo("")
    if data["jobs"]:
        echo_table(
            ["JOB", "KIND", "STATE", "GEN", "ATTEMPTS", "LAST ERROR"],
            [
                [str(j["id"]), j["kind"], j["state"], str(j["generation"]), str(j["attempts"]), j["last_error"] or ""]
                for j in data["jobs"]
            ],
        )
    else:
        typer.echo("no jobs")
    typer.echo("")
    if data["results"]:
        echo_table(
            ["RESULT", "GEN", "LABEL", "URGENCY", "URGENT", "MODEL", "STATUS", "CREATED (UTC)"],
            [
                [
                    str(r["id"]),
                    str(r["generation"]),
                    r["label"] or "-",
                    "-" if r["urgency"] is None else f"{r['urgency']:.3f}",
                    "yes" if r["urgent"] else "no",
                    r["model"],
                    r["status"] + (f" ({r['reason']})" if r["reason"] else ""),
                    (r["created_at"] or "")[:19],
                ]
                for r in data["results"]
            ],
        )
    else:
        typer.echo("no results")


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="series")
