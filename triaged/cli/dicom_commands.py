"""`triaged echo PEER` and `triaged send PATH... --to PEER`: talk to a DICOM node from the shell.

PEER is a peer name from ``[dicom.peers]`` or ``AE@host:port``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from triaged.cli.common import echo_json, fail, settings_from
from triaged.errors import TriagedError

if TYPE_CHECKING:  # pydicom and pynetdicom are imported by the commands that talk DICOM, not by `triaged --help`
    from triaged.config import Settings
    from triaged.outputs.send import SendResult

_LITERAL_PEER = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>[^:]+):(?P<port>\d{1,5})$")


@dataclass(frozen=True)
class Target:
    ae_title: str
    host: str
    port: int


def resolve_peer(settings: Settings, peer: str) -> Target:
    """A configured peer by name, or a literal ``AE@host:port``; raise ValueError otherwise."""
    if peer in settings.dicom.peers:
        configured = settings.dicom.peers[peer]
        return Target(configured.ae_title, configured.host, configured.port)
    match = _LITERAL_PEER.match(peer)
    if match is None:
        known = ", ".join(sorted(settings.dicom.peers)) or "none configured"
        raise ValueError(f"unknown peer {peer!r}: use a name from [dicom.peers] ({known}) or AE@host:port")
    port = int(match["port"])
    if not 1 <= port <= 65535:
        raise ValueError(f"port out of range in {peer!r}")
    return Target(match["ae"], match["host"], port)


PeerArg = Annotated[str, typer.Argument(help="Peer name from the dicom.peers config table, or AE@host:port.")]
CallingAe = Annotated[
    str | None, typer.Option("--calling-ae", help="Our AE title (default: dicom.ae_title).", show_default=False)
]
Timeout = Annotated[float, typer.Option("--timeout", min=0.1, help="Seconds for connect and each response.")]
TlsCa = Annotated[Path | None, typer.Option("--tls-ca", exists=True, dir_okay=False, help="Use TLS; trust this CA.")]
TlsCert = Annotated[Path | None, typer.Option("--tls-cert", exists=True, dir_okay=False, help="Client certificate.")]
TlsKey = Annotated[Path | None, typer.Option("--tls-key", exists=True, dir_okay=False, help="Client private key.")]
JsonOut = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def _connection(
    ctx: typer.Context,
    peer: str,
    calling_ae: str | None,
    timeout: float,
    tls: tuple[Path | None, Path | None, Path | None],
) -> tuple[Target, dict[str, Any]]:
    settings = settings_from(ctx)
    try:
        target = resolve_peer(settings, peer)
    except ValueError as exc:
        fail(str(exc))
    ca_file, cert_file, key_file = tls
    kwargs: dict[str, Any] = {
        "called_ae_title": target.ae_title,
        "calling_ae_title": calling_ae or settings.dicom.ae_title,
        "timeout": timeout,
    }
    if ca_file is not None or cert_file is not None:
        from triaged.receive.tls import client_ssl_context

        try:
            kwargs["ssl_context"] = client_ssl_context(ca_file=ca_file, cert_file=cert_file, key_file=key_file)
        except TriagedError as exc:
            fail(str(exc))
    return target, kwargs


def echo_command(  # noqa: PLR0917 - Typer options
    ctx: typer.Context,
    peer: PeerArg,
    calling_ae: CallingAe = None,
    timeout: Timeout = 10.0,
    tls_ca: TlsCa = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    as_json: JsonOut = False,
) -> None:
    """C-ECHO a DICOM node (verification); exit 1 unless it answers success."""
    from triaged.outputs.send import echo

    target, kwargs = _connection(ctx, peer, calling_ae, timeout, (tls_ca, tls_cert, tls_key))
    try:
        code = echo(target.host, target.port, **kwargs)
    except TriagedError as exc:
        fail(str(exc))
    if as_json:
        echo_json({"peer": peer, "status": code, "status_hex": f"0x{code:04X}", "ok": code == 0})
    else:
        typer.echo(f"{target.ae_title}@{target.host}:{target.port}: C-ECHO 0x{code:04X}")
    if code != 0:
        raise typer.Exit(1)


def _result_dict(result: SendResult) -> dict[str, Any]:
    return {
        "path": str(result.path),
        "sop_instance_uid": result.sop_instance_uid,
        "status": result.status,
        "status_hex": None if result.status is None else f"0x{result.status:04X}",
        "ok": result.ok,
        "error": result.error,
    }


def send_command(  # noqa: PLR0917 - Typer options
    ctx: typer.Context,
    paths: Annotated[list[Path], typer.Argument(exists=True, help="DICOM files or folders (searched recursively).")],
    to: Annotated[str, typer.Option("--to", help="Peer name from the dicom.peers config table, or AE@host:port.")],
    calling_ae: CallingAe = None,
    timeout: Timeout = 30.0,
    tls_ca: TlsCa = None,
    tls_cert: TlsCert = None,
    tls_key: TlsKey = None,
    as_json: JsonOut = False,
) -> None:
    """C-STORE files unchanged (their own SOP class and transfer syntax); one status line per file."""
    from triaged.outputs.send import SendResult, iter_files, read_dicom_file, send_files
    from triaged.receive.status import status_name

    target, kwargs = _connection(ctx, to, calling_ae, timeout, (tls_ca, tls_cert, tls_key))
    files, skipped = [], []
    for path in iter_files(paths):
        try:
            files.append(read_dicom_file(path))
        except ValueError as exc:
            skipped.append(SendResult(path, "", None, str(exc)))
    if not files and not skipped:
        fail("no files found")
    results: list[SendResult] = []
    if files:
        try:
            results = send_files(files, target.host, target.port, **kwargs)
        except TriagedError as exc:
            fail(str(exc))
    results += skipped
    if as_json:
        echo_json([_result_dict(r) for r in results])
    else:
        for result in results:
            if result.status is None:
                typer.echo(f"FAILED  ------  {result.path}: {result.error}")
            else:
                word = "OK" if result.ok else "FAILED"
                detail = (
                    "" if result.ok else f" ({status_name(result.status)}{': ' + result.error if result.error else ''})"
                )
                typer.echo(f"{word:<7} 0x{result.status:04X}  {result.path}{detail}")
        failed = sum(not r.ok for r in results)
        typer.echo(f"{len(results) - failed} of {len(results)} stored on {target.ae_title}@{target.host}:{target.port}")
    if any(not r.ok for r in results):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("echo")(echo_command)
    app.command("send")(send_command)
