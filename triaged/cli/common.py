"""Shared CLI plumbing: settings from the root callback, database access, one-line errors.

pydantic (settings), SQLAlchemy, Alembic and structlog are imported inside the helpers that use them, so
`triaged --help` and the commands that never open the database start without them (tests/unit/test_cli_imports.py).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import typer

from triaged.errors import TriagedError

if TYPE_CHECKING:
    from sqlalchemy import Engine
    from sqlalchemy.orm import Session, sessionmaker

    from triaged.config import Settings

EXIT_FAILURE = 1
EXIT_USAGE = 2


@dataclass
class CliState:
    config_file: Path | None = None
    settings: Settings | None = None


def fail(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    """Print one line to stderr and exit; user mistakes never show a traceback."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def settings_from(ctx: typer.Context) -> Settings:
    state: CliState = ctx.ensure_object(CliState)
    if state.settings is None:
        try:
            from triaged.config import load_settings

            state.settings = load_settings(state.config_file)
        except TriagedError as exc:
            fail(str(exc), EXIT_USAGE)
        from triaged.log import configure_logging

        configure_logging(state.settings.log_level, state.settings.log_format)
    return state.settings


def open_engine(settings: Settings, *, require_current: bool = True) -> Engine:
    from triaged.db.engine import make_engine
    from triaged.db.schema import require_current_schema

    engine = make_engine(settings.database_url, busy_timeout_ms=settings.database.busy_timeout_ms)
    if require_current:
        try:
            require_current_schema(engine)
        except TriagedError as exc:
            fail(str(exc))
    return engine


@contextmanager
def session_scope(settings: Settings) -> Iterator[Session]:
    """A session on an up-to-date database, committed on success."""
    from triaged.db.engine import make_session_factory

    factory: sessionmaker[Session] = make_session_factory(open_engine(settings))
    with factory.begin() as session:
        yield session


def echo_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


def echo_table(headers: list[str], rows: list[list[str]]) -> None:
    """Plain aligned table: readable in a terminal and in a log."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    typer.echo("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for row in rows:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
