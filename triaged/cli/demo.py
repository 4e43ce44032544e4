"""`triaged demo`: one command that shows the whole loop (see triaged/demo.py)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from triaged.cli.common import echo_json, echo_table, fail
from triaged.errors import TriagedError

if TYPE_CHECKING:  # the demo pulls in pydicom, SQLAlchemy and the model: imported when it runs
    from triaged.demo import DemoReport


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _print(report: DemoReport) -> None:
    typer.echo("")
    typer.echo(report.study_note)
    typer.echo(f"{report.model_note} ({report.model_name})")
    typer.echo("")
    classes = sorted({name for s in report.series for name in s.probabilities})
    rows = []
    for number, series in enumerate(report.series, start=1):
        finding = series.label or series.status
        if series.status == "not_assessable":
            finding = f"not assessable: {series.reason}"
        rows.append(
            [
                f"{number} {series.description}",
                str(series.slices),
                finding,
                *(_fmt(series.probabilities.get(name)) for name in classes),
                f"{_fmt(series.urgency)} / {_fmt(series.threshold)}",
                "URGENT" if series.urgent else "no",
                _fmt(series.inference_seconds, 1),
                _fmt(series.end_to_end_seconds, 1),
                f"{len(series.pngs)} ({series.export_state})",
            ]
        )
    echo_table(
        [
            "SERIES",
            "SLICES",
            "FINDING",
            *(f"P({c})" for c in classes),
            "URGENCY/THR",
            "URGENT?",
            "INFER s",
            "E2E s",
            "SCs",
        ],
        rows,
    )
    pngs = [path for series in report.series for path in series.pngs]
    typer.echo("")
    if pngs:
        typer.echo(f"Secondary Captures written as PNG ({len(pngs)}):")
        for path in pngs:
            typer.echo(f"  {path}")
    typer.echo(
        "AI TRIAGE - NOT FOR DIAGNOSTIC USE. E2E = from the C-STORE until the outputs were stored by the demo PACS."
    )


def demo(  # noqa: PLR0917 - Typer options
    images: Annotated[
        Path | None,
        typer.Option(
            "--images", help="Build the study from this folder of slice images (PNG/JPEG) instead.", file_okay=False
        ),
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="Where the Secondary Capture PNGs go.")] = Path(
        "triaged-demo-output"
    ),
    model: Annotated[
        Path | None, typer.Option("--model", help="Model directory (default: the shipped model).", file_okay=False)
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=500, help="At most this many images from --images.")] = 24,
    slices: Annotated[int, typer.Option("--slices", min=4, max=64, help="Slices per phantom series.")] = 12,
    timeout: Annotated[float, typer.Option("--timeout", min=10, help="Seconds to wait for results.")] = 600.0,
    keep: Annotated[bool, typer.Option("--keep", help="Keep the temporary data directory.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Run triaged end to end on a small study it builds itself, and write the outputs as PNG files."""
    if images is not None and not images.is_dir():
        fail(f"--images: not a directory: {images}", 2)
    from triaged.demo import DemoError, DemoOptions, run_demo
    from triaged.log import configure_logging

    configure_logging("warning", "console")
    logging.getLogger("apscheduler").setLevel(logging.ERROR)  # "skipped: max instances" noise on a busy CPU
    options = DemoOptions(
        out=out, images=images, limit=limit, model_dir=model, slices=slices, timeout=timeout, keep=keep
    )
    try:
        report = run_demo(options, say=lambda line: typer.echo(line, err=as_json))
    except DemoError as exc:
        fail(str(exc))
    except TriagedError as exc:
        fail(f"demo failed: {exc}")
    if as_json:
        echo_json(
            {
                "study": report.study_note,
                "model": report.model_name,
                "series": [
                    {
                        "description": s.description,
                        "series_instance_uid": s.series_instance_uid,
                        "slices": s.slices,
                        "status": s.status,
                        "label": s.label,
                        "probabilities": s.probabilities,
                        "urgency": s.urgency,
                        "threshold": s.threshold,
                        "urgent": s.urgent,
                        "reason": s.reason,
                        "inference_seconds": s.inference_seconds,
                        "end_to_end_seconds": s.end_to_end_seconds,
                        "export_state": s.export_state,
                        "pngs": [str(p) for p in s.pngs],
                    }
                    for s in report.series
                ],
            }
        )
    else:
        _print(report)
    if any(s.export_state in ("failed", "dead") for s in report.series):
        fail("some outputs could not be sent (see the table)")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
