"""`triaged demo`: the whole loop on one machine, with nothing but the clone.

Starts the daemon in-process on the embedded default (SQLite in a temp data dir, the shipped model), plus a
stand-in PACS (an in-memory storage SCP), builds a small MR study with the project's own code (a synthetic
phantom, or a folder of slice images), sends it by C-STORE as the PACS would, waits for the results and the
outputs coming back, and writes the Secondary Captures as PNG files.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import SecondaryCaptureImageStorage
from sqlalchemy import select

from triaged.config import DEFAULT_MODEL_DIR, Settings, load_settings
from triaged.db.engine import make_engine, make_session_factory
from triaged.db.models import Job, JobKind, JobState, Output, Result, Series
from triaged.db.schema import upgrade
from triaged.demo_phantom import image_files, phantom_series, slices_from_images
from triaged.dicom.synthetic import derived_uid, write_mr_series
from triaged.errors import TriagedError
from triaged.outputs.dimse import Destination, SendOptions, send_files
from triaged.outputs.sink import StorageSink

DEMO_CALLING_AE = "DEMOSCU"
FINISHED = (JobState.DONE, JobState.FAILED, JobState.DEAD)


class DemoError(TriagedError):
    """The demo could not complete."""


@dataclass(frozen=True)
class DemoOptions:
    out: Path = Path("triaged-demo-output")
    images: Path | None = None
    limit: int = 24
    model_dir: Path | None = None
    slices: int = 12
    timeout: float = 600.0
    keep: bool = False


@dataclass
class SeriesReport:
    series_instance_uid: str
    description: str
    slices: int
    status: str = "pending"
    label: str | None = None
    probabilities: dict[str, float] = field(default_factory=dict)
    urgency: float | None = None
    threshold: float | None = None
    urgent: bool = False
    reason: str | None = None
    inference_seconds: float | None = None
    end_to_end_seconds: float | None = None
    export_state: str | None = None
    pngs: list[Path] = field(default_factory=list)


@dataclass
class DemoReport:
    study_note: str
    model_note: str
    model_name: str = ""
    series: list[SeriesReport] = field(default_factory=list)
    work_dir: Path | None = None


def _model(options: DemoOptions, work: Path, say: Callable[[str], None]) -> tuple[Path, str]:
    model_dir = options.model_dir or DEFAULT_MODEL_DIR
    if (model_dir / "model.json").is_file() and (model_dir / "model.safetensors").is_file():
        return model_dir, f"model: {model_dir}"
    if options.model_dir is not None:
        raise DemoError(f"no model in {model_dir} (needs model.json and model.safetensors)")
    from triaged.ml.registry import build_random_model_dir

    say(f"note: the shipped model is missing ({model_dir}); using a RANDOMLY INITIALISED model instead.")
    random_dir = build_random_model_dir(work / "random-model", seed=0)
    return random_dir, "model: randomly initialised (the shipped model is missing): its scores are MEANINGLESS"


def build_study(options: DemoOptions, out_dir: Path) -> tuple[list[tuple[str, list[Path]]], str]:
    """Write the demo study; return [(description, files)] per series and an honest note on what it is."""
    study_uid = derived_uid("triaged-demo-study", time.time_ns())
    if options.images is not None:
        files = image_files(options.images, options.limit)
        if not files:
            raise DemoError(f"no PNG/JPEG images in {options.images}")
        slices = slices_from_images(files)
        description = "T1 AX (from images)"
        # The images may be unrelated crops, so their slices carry no position: a made-up spacing would let the
        # below-the-brain rule drop images more than 170 mm "below" the last one.
        paths = write_mr_series(
            slices, out_dir / "images", study_instance_uid=study_uid, series_description=description, positions=False
        )
        note = (
            f"demo study: {len(files)} images from {options.images} (sorted, first {options.limit}), each "
            "wrapped as one slice of one MR series by triaged, with no slice positions; the images are not a real"
            " volume."
        )
        return [(description, paths)], note
    series = []
    for number, lesion in ((1, False), (2, True)):
        description = "T1 AX POST GD PHANTOM" + (" WITH LESION" if lesion else "")
        slices = phantom_series(options.slices, lesion=lesion, seed=number)
        paths = write_mr_series(
            slices,
            out_dir / f"series{number}",
            study_instance_uid=study_uid,
            series_description=description,
            series_number=number,
            seed=f"demo-{study_uid}-{number}",
        )
        series.append((description, paths))
    note = (
        "demo study: a SYNTHETIC brain phantom drawn by triaged with numpy (ellipses for scalp, skull, cortex, white "
        "matter and ventricles); series 2 adds a synthetic ring-enhancing 'lesion'. It is not a patient scan: the "
        "model was trained on real MR slices, so its answer on a phantom says nothing about clinical performance."
    )
    return series, note


def _settings(work: Path, model_dir: Path, port: int, sink: StorageSink) -> Settings:
    return load_settings(
        None,
        data_dir=work / "data",
        log_level="warning",
        dicom={
            "ae_title": "TRIAGED",
            "bind_address": "127.0.0.1",
            "port": port,
            "peers": {"demo": {"ae_title": sink.ae_title, "host": sink.host, "port": sink.port}},
            "accept_unknown_peers": True,
        },
        storage={"min_free_bytes": 0},
        series={"quiet_seconds": 1.0, "sweep_interval_seconds": 0.25},
        worker={"count": 1, "poll_seconds": 0.1, "backoff_base_seconds": 1.0, "backoff_max_seconds": 5.0},
        model={"directory": model_dir, "device": "cpu"},
        outputs={"destination": "demo", "mode": "all"},
        http={"enabled": False},
    )


def _poll(settings: Settings, reports: dict[str, SeriesReport], started: float) -> bool:
    """Update reports from the database; True when every series has a result and a finished export."""
    engine = make_engine(settings.database_url)
    try:
        with make_session_factory(engine)() as session:
            for uid, report in reports.items():
                series = session.scalar(select(Series).where(Series.series_instance_uid == uid))
                if series is None:
                    continue
                result = session.scalars(
                    select(Result).where(Result.series_id == series.id).order_by(Result.id.desc())
                ).first()
                if result is None:
                    report.status = str(series.state)
                    continue
                report.status, report.label, report.reason = str(result.status), result.label, result.reason
                report.probabilities = dict(result.probabilities or {})
                report.urgency, report.threshold, report.urgent = result.urgency, result.threshold, result.urgent
                report.inference_seconds = (result.timings or {}).get("total")
                export = session.scalars(
                    select(Job).where(Job.kind == JobKind.EXPORT, Job.series_id == series.id).order_by(Job.id.desc())
                ).first()
                report.export_state = str(export.state) if export is not None else "none"
                if report.end_to_end_seconds is None and (export is None or export.state in FINISHED):
                    report.end_to_end_seconds = time.monotonic() - started
        return all(r.end_to_end_seconds is not None for r in reports.values())
    finally:
        engine.dispose()


def _write_pngs(settings: Settings, sink: StorageSink, reports: dict[str, SeriesReport], out: Path) -> None:
    received = {str(ds.SOPInstanceUID): ds for ds in sink.datasets() if ds.SOPClassUID == SecondaryCaptureImageStorage}
    engine = make_engine(settings.database_url)
    try:
        with make_session_factory(engine)() as session:
            rows = session.execute(
                select(Output.sop_instance_uid, Series.series_instance_uid, Output.id)
                .join(Result, Result.id == Output.result_id)
                .join(Series, Series.id == Result.series_id)
                .order_by(Output.id)
            ).all()
    finally:
        engine.dispose()
    out.mkdir(parents=True, exist_ok=True)
    for number, (uid, report) in enumerate(reports.items(), start=1):
        datasets: list[Dataset] = [
            received[sop] for sop, series_uid, _ in rows if series_uid == uid and sop in received
        ]
        for index, ds in enumerate(datasets, start=1):
            path = out / f"series{number}_{report.label or report.status}_sc{index}.png"
            Image.fromarray(np.asarray(ds.pixel_array, dtype=np.uint8), mode="RGB").save(path)
            report.pngs.append(path)


def run_demo(options: DemoOptions, say: Callable[[str], None] = print) -> DemoReport:
    """Run the demo end to end; raise :class:`DemoError` if it cannot finish."""
    from triaged.daemon import Daemon

    work = Path(tempfile.mkdtemp(prefix="triaged-demo-"))
    sink = StorageSink()
    daemon: Daemon | None = None
    try:
        model_dir, model_note = _model(options, work, say)
        series, study_note = build_study(options, work / "study")
        sink.start()
        settings = _settings(work, model_dir, 0, sink)  # port 0: the receiver binds a free port itself
        engine = make_engine(settings.database_url)
        upgrade(engine)
        engine.dispose()
        say(f"starting triaged (data in {work}); loading the model ...")
        daemon = Daemon(settings)
        daemon.start()
        if daemon.receiver is None:  # pragma: no cover - Daemon(settings) always receives
            raise DemoError("the DICOM receiver did not start")
        port = daemon.receiver.port
        say(f"triaged listening: DICOM TRIAGED@127.0.0.1:{port}")
        triage = daemon.runtime.triage if daemon.runtime else None
        model_name = f"{triage.model_name} {triage.model_version}" if triage else ""
        report = DemoReport(study_note=study_note, model_note=model_note, model_name=model_name, work_dir=work)
        reports: dict[str, SeriesReport] = {}
        started = time.monotonic()
        for description, paths in series:
            from pydicom import dcmread

            uid = str(dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)
            reports[uid] = SeriesReport(uid, description, len(paths))
            send_files(paths, Destination("triaged", "TRIAGED", "127.0.0.1", port), SendOptions(DEMO_CALLING_AE))
        say(
            f"sent {sum(len(p) for _, p in series)} instances in {len(series)} series by C-STORE; "
            "waiting for results ..."
        )
        deadline = started + options.timeout
        while not _poll(settings, reports, started):
            if time.monotonic() > deadline:
                raise DemoError(f"no results within {options.timeout:.0f} s (see {work})")
            time.sleep(0.25)
        _write_pngs(settings, sink, reports, options.out)
        report.series = list(reports.values())
        return report
    finally:
        if daemon is not None:
            daemon.stop(grace_seconds=5)
        sink.stop()
        if not options.keep:
            shutil.rmtree(work, ignore_errors=True)
