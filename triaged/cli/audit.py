"""`triaged audit list`: the audit trail (associations, stored instances, admin actions), newest first.

SQLAlchemy and the models are imported inside the command: `triaged --help` must not pay for them.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Annotated

import typer

from triaged.cli.common import echo_json, echo_table, fail, open_engine, settings_from
from triaged.db.states import AuditKind

KINDS = tuple(kind.value for kind in AuditKind)

audit_app = typer.Typer(help="The audit trail.", no_args_is_help=True)


def _since(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        fail(f"--since: not an ISO date/time: {value!r} (e.g. 2026-11-25 or 2026-11-25T10:00)", 2)
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


@audit_app.command("list")
def list_command(
    ctx: typer.Context,
    since: Annotated[str | None, typer.Option("--since", help="Events at or after (ISO date/time, UTC).")] = None,
    kind: Annotated[
        list[str] | None, typer.Option("--kind", help=f"Only these kinds (repeatable): {', '.join(KINDS)}.")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many events.")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show audit events, newest first."""
    from triaged.db import audit
    from triaged.db.engine import make_session_factory

    unknown = sorted(set(kind or []) - set(KINDS))
    if unknown:
        fail(f"--kind: unknown kind(s) {', '.join(unknown)}; known: {', '.join(KINDS)}", 2)
    cutoff = _since(since)
    engine = open_engine(settings_from(ctx))
    try:
        with make_session_factory(engine)() as session:
            events = audit.list_events(session, since=cutoff, kinds=kind or [], limit=limit)
        rows = [
            {
                "id": e.id,
                "at": e.at.isoformat(),
                "kind": e.kind,
                "actor": e.actor,
                "peer_address": e.peer_address,
                "calling_ae_title": e.calling_ae_title,
                "called_ae_title": e.called_ae_title,
                "outcome": e.outcome,
                "reason": e.reason,
                "detail": e.detail,
            }
            for e in events
        ]
    finally:
        engine.dispose()  # no pooled connection outlives the command
    if as_json:
        echo_json(rows)
        return
    echo_table(
        ["ID", "AT", "KIND", "ACTOR", "PEER", "OUTCOME", "REASON", "DETAIL"],
        [
            [
                str(r["id"]),
                str(r["at"])[:19],
                str(r["kind"]),
                str(r["actor"]),
                str(r["peer_address"] or ""),
                str(r["outcome"]),
                str(r["reason"] or ""),
                _short_detail(r["detail"]),
            ]
            for r in rows
        ],
    )


def _short_detail(detail: object) -> str:
    """Counts and flags only; lists (hashes, ids) are summarised by their length."""
    if not isinstance(detail, dict):
        return ""
    parts = [f"{k}={len(v) if isinstance(v, list) else json.dumps(v)}" for k, v in detail.items() if v is not None]
    return " ".join(parts)


def register(app: typer.Typer) -> None:
    app.add_typer(audit_app, name="audit")
