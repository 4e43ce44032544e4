"""`triaged receivers list` and `receivers forget ID`: the receivers' heartbeats and what they hold open.

A receiver host that never comes back is reaped after ``dicom.receiver_timeout_seconds``; `forget` is the
operator's way not to wait (a host known to be gone for good), and is refused for a receiver that is alive.
SQLAlchemy and the models are imported inside the commands: `triaged --help` must not pay for them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import typer

from triaged.cli.common import echo_json, echo_table, fail, open_engine, settings_from
from triaged.errors import NotFoundError

receivers_app = typer.Typer(help="Receivers: heartbeats and open associations.", no_args_is_help=True)


def _when(value: str | None) -> str:
    return value[:19].replace("T", " ") if value else "-"


def _age(value: str | None, now: datetime) -> str:
    if not value:
        return "never"
    return f"{(now - datetime.fromisoformat(value)).total_seconds():.0f} s ago"


@receivers_app.command("list")
def list_command(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Every receiver: id, host, last heartbeat, state (alive, stopped, dead) and open associations."""
    from triaged.db import receivers
    from triaged.db.engine import make_session_factory
    from triaged.db.models import utcnow

    settings = settings_from(ctx)
    now = utcnow()
    engine = open_engine(settings)
    try:
        with make_session_factory(engine)() as session:
            infos = receivers.list_receivers(session, timeout_seconds=settings.dicom.receiver_timeout_seconds, now=now)
    finally:
        engine.dispose()  # no pooled connection outlives the command
    rows = [info.model_dump(mode="json") for info in infos]
    if as_json:
        echo_json(rows)
        return
    echo_table(
        ["ID", "HOST", "PID", "STATE", "LAST HEARTBEAT", "AGE", "OPEN ASSOCIATIONS"],
        [
            [
                str(r["id"]),
                str(r["host"] or "-"),
                str(r["pid"] or "-"),
                str(r["state"]),
                _when(r["heartbeat_at"]),
                _age(r["heartbeat_at"], now),
                str(r["open_associations"]),
            ]
            for r in rows
        ],
    )


@receivers_app.command("forget")
def forget_command(
    ctx: typer.Context,
    receiver_id: Annotated[str, typer.Argument(metavar="ID", help="A receiver id from `triaged receivers list`.")],
    force: Annotated[
        bool,
        typer.Option("--force", help="Also when its heartbeat is fresh (series it is receiving may complete early)."),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Close a gone receiver's open associations now (its series complete) and forget it; audited."""
    from triaged.db import receivers
    from triaged.db.engine import make_session_factory

    settings = settings_from(ctx)
    engine = open_engine(settings)
    try:
        closed = receivers.forget(
            make_session_factory(engine),
            receiver_id,
            timeout_seconds=settings.dicom.receiver_timeout_seconds,
            force=force,
        )
    except (NotFoundError, receivers.ReceiverAliveError) as exc:
        fail(str(exc))
    finally:
        engine.dispose()
    if as_json:
        echo_json(
            {
                "receiver_id": receiver_id,
                "closed": [{"association_id": c.association_id, "instances": c.instances} for c in closed],
            }
        )
        return
    instances = sum(c.instances for c in closed)
    typer.echo(
        f"forgot receiver {receiver_id}: closed {len(closed)} open association(s) "
        f"({instances} instance(s) stored on them; their series complete after the quiet period)"
    )


def register(app: typer.Typer) -> None:
    app.add_typer(receivers_app, name="receivers")
