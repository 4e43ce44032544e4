"""`triaged series list` and `triaged series show UID`: what was received, what was found, where it stands.

Both read through :mod:`triaged.db.queries`, the same functions as the JSON API and the console.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any

import typer

from triaged.cli.common import echo_json, echo_table, fail, open_engine, settings_from
from triaged.db.states import SeriesState
from triaged.errors import NotFoundError

if TYPE_CHECKING:  # SQLAlchemy is imported by the commands when they run, not by `triaged --help`
    from sqlalchemy.orm import Session

    from triaged.config import Settings
    from triaged.db.views import SeriesSummary

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


def _finding(s: SeriesSummary) -> str:
    if s.result_status == "not_assessable":
        return "not assessable"
    if s.result_status is None:
        return "-"
    return ("URGENT " if s.urgent else "") + (s.label or "-")


def _urgency(s: SeriesSummary) -> str:
    if s.urgency is None:
        return "-"
    return f"{s.urgency:.3f}" + (f" / {s.threshold:.3f}" if s.threshold is not None else "")


@app.command("list")
def list_series(
    ctx: typer.Context,
    state: Annotated[
        SeriesState | None, typer.Option("--state", case_sensitive=False, help="Only series in this state.")
    ] = None,
    urgent: Annotated[bool, typer.Option("--urgent", help="Only series whose latest result is urgent.")] = False,
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most N series.")] = 50,
    as_json: Json = False,
) -> None:
    """The worklist: urgent findings first, then the most recently received series."""
    from triaged.db import queries

    settings = settings_from(ctx)
    with _session(settings) as session:
        page = queries.list_series(session, state=state, urgent=True if urgent else None, limit=limit)
    if as_json:
        echo_json([item.model_dump(mode="json") for item in page.items])
        return
    if not page.items:
        typer.echo("no series")
        return
    rows = [
        [
            str(s.id),
            s.state,
            _finding(s),
            _urgency(s),
            s.modality or "-",
            str(s.instance_count),
            s.calling_ae_title or "-",
            s.last_received_at.isoformat()[:19],
            s.series_instance_uid,
            s.not_assessable_reason or s.skip_reason or "",
        ]
        for s in page.items
    ]
    echo_table(
        [
            "ID",
            "STATE",
            "FINDING",
            "URGENCY / THRESHOLD",
            "MOD",
            "INST",
            "FROM",
            "LAST RECEIVED (UTC)",
            "SERIES INSTANCE UID",
            "REASON",
        ],
        rows,
    )
    if page.total > len(page.items):
        typer.echo(f"({len(page.items)} of {page.total}; --limit N for more)")


def _show_data(session: Session, series_instance_uid: str) -> dict[str, Any] | None:
    from triaged.db import queries

    try:
        data: dict[str, Any] = queries.series_detail(session, series_instance_uid).model_dump(mode="json")
    except NotFoundError:
        return None
    for result in data["results"]:
        result.pop("slices")  # `triaged results show` prints them
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
