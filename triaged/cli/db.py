"""`triaged db …`: schema migrations."""

from __future__ import annotations

import typer

from triaged.cli.common import open_engine, settings_from

app = typer.Typer(help="Database schema.", no_args_is_help=True)


@app.command("upgrade")
def upgrade_command(ctx: typer.Context) -> None:
    """Migrate the database to the schema this version needs (safe to run again)."""
    from triaged.db.schema import current_revision, upgrade

    settings = settings_from(ctx)
    engine = open_engine(settings, require_current=False)
    before = current_revision(engine)
    upgrade(engine)
    after = current_revision(engine)
    typer.echo(f"database at {after}" + ("" if before == after else f" (was {before or 'empty'})"))


@app.command("status")
def status_command(ctx: typer.Context) -> None:
    """Show the schema revision and whether it is current."""
    from triaged.db.schema import current_revision, head_revision

    settings = settings_from(ctx)
    engine = open_engine(settings, require_current=False)
    current = current_revision(engine)
    head = head_revision(settings.database_url)
    typer.echo(
        f"current {current or 'empty'}, head {head}: {'up to date' if current == head else 'run `triaged db upgrade`'}"
    )
    if current != head:
        raise typer.Exit(1)
