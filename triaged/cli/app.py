"""Typer root: `triaged …`. Each command group lives in its own module (style P15)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from triaged import __version__
from triaged.cli import audit as audit_cli
from triaged.cli import daemon as daemon_cli
from triaged.cli import db, dicom_commands, ml_commands
from triaged.cli import demo as demo_cli
from triaged.cli import jobs as jobs_cli
from triaged.cli import outputs as outputs_cli
from triaged.cli import receivers as receivers_cli
from triaged.cli import series as series_cli
from triaged.cli import users as users_cli
from triaged.cli.common import CliState

app = typer.Typer(
    name="triaged",
    help="DICOM triage daemon for brain MRI: receive, classify, send flagged Secondary Captures back.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(db.app, name="db")
daemon_cli.register(app)
jobs_cli.register(app)
outputs_cli.register(app)
demo_cli.register(app)
dicom_commands.register(app)
series_cli.register(app)
users_cli.register(app)
audit_cli.register(app)
receivers_cli.register(app)
app.command("train")(ml_commands.train_command)
app.command("evaluate")(ml_commands.evaluate_command)
model_app = typer.Typer(help="The shipped classifier.", no_args_is_help=True)
model_app.command("info")(ml_commands.model_info_command)
app.add_typer(model_app, name="model")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"triaged {__version__}")
        raise typer.Exit


@app.callback()
def root(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", envvar="TRIAGED_CONFIG", help="TOML config file.", dir_okay=False),
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Load settings lazily so `--help` works even with a broken config."""
    ctx.obj = CliState(config_file=config)


def main() -> None:
    app()
