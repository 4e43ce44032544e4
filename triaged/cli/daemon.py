"""`triaged serve` (receiver + workers + housekeeping) and `triaged worker` (workers only)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from triaged.cli.common import fail, settings_from
from triaged.errors import TriagedError

if TYPE_CHECKING:
    from triaged.config import Settings

DataDir = Annotated[
    Path | None,
    typer.Option("--data-dir", help="Data directory (database, storage); overrides data_dir. Env: TRIAGED_DATA_DIR."),
]
Workers = Annotated[
    int | None, typer.Option("--workers", min=0, help="Worker threads; overrides worker.count (TRIAGED_WORKER__COUNT).")
]


def _settings(ctx: typer.Context, data_dir: Path | None, workers: int | None, **http: Any) -> Settings:
    settings = settings_from(ctx)
    update: dict[str, Any] = {}
    if data_dir is not None:
        update["data_dir"] = data_dir.resolve()
    if workers is not None:
        update["worker"] = settings.worker.model_copy(update={"count": workers})
    if http:
        update["http"] = settings.http.model_copy(update=http)
    return settings.model_copy(update=update) if update else settings


def _announce(daemon: Any) -> None:
    settings: Settings = daemon.settings
    parts = []
    if daemon.receiver is not None:
        parts.append(f"DICOM {settings.dicom.ae_title} on {settings.dicom.bind_address}:{daemon.receiver.port}")
    if daemon.http is not None:
        base = f"{daemon.http.scheme}://{settings.http.bind_address}:{daemon.http.port}"
        parts.append(f"HTTP on {base} (/healthz /readyz /metrics)")
    parts.append(f"{settings.worker.count} worker(s)")
    typer.echo("triaged listening: " + ", ".join(parts))
    if daemon.http is not None:
        host = settings.http.bind_address
        if host in ("0.0.0.0", "::", ""):  # listening everywhere: name this host, not the wildcard
            host = socket.gethostname()
        elif ":" in host:
            host = f"[{host}]"
        typer.echo(
            f"console: {daemon.http.scheme}://{host}:{daemon.http.port}/ "
            "(accounts: `triaged user add NAME --role viewer|admin`)"
        )


def _run(settings: Settings, *, receive: bool) -> None:
    from triaged.daemon import Daemon

    daemon = Daemon(settings, receive=receive)
    try:
        code = daemon.run_until_signal(on_started=_announce)
    except TriagedError as exc:
        fail(str(exc))
    except OSError as exc:  # e.g. the DICOM or HTTP port is already in use
        fail(f"cannot start: {exc.strerror or exc}")
    raise typer.Exit(code)


def serve(ctx: typer.Context, data_dir: DataDir = None, workers: Workers = None) -> None:
    """Receive DICOM, triage complete series and send outputs, until SIGTERM/SIGINT."""
    _run(_settings(ctx, data_dir, workers), receive=True)


def worker(
    ctx: typer.Context,
    data_dir: DataDir = None,
    workers: Workers = None,
    http_port: Annotated[
        int | None, typer.Option("--http-port", min=0, help="Serve /healthz /readyz /metrics (0 = any free port).")
    ] = None,
) -> None:
    """Run queue workers only (more processes or hosts against one PostgreSQL with shared storage)."""
    http: dict[str, Any] = {"enabled": False} if http_port is None else {"enabled": True, "port": http_port}
    settings = _settings(ctx, data_dir, workers, **http)
    if settings.worker.count == 0:  # worker.count = 0 configures a receive-only `serve`; a worker always works
        settings = settings.model_copy(update={"worker": settings.worker.model_copy(update={"count": 1})})
    _run(settings, receive=False)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
    app.command("worker")(worker)
