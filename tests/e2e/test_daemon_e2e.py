"""`triaged serve` as a subprocess: C-STORE series in, results rows out, probes, late instances, SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from tests.conftest import shared_data
from tests.support.pipeline_daemon import daemon_config, running_daemon, send_series, write_config
from tests.support.pipeline_support import (
    SHIPPED_MODEL,
    TOSHIBA_DWI,
    UIH_T1,
    XA30_MPRAGE,
    jobs_for,
    kaggle_files,
    labelled_series,
    load_slice,
    results_for,
    shipped_model_available,
    wait_for,
)
from triaged.db.engine import make_engine, make_session_factory
from triaged.db.models import JobState, Result, ResultStatus, Series, SeriesState, SlicePrediction
from triaged.db.schema import upgrade
from triaged.dicom.synthetic import write_mr_series

pytestmark = [
    pytest.mark.filterwarnings("ignore:The pixel data is .* bytes long:UserWarning"),
]


@pytest.fixture
def sqlite_factory(sqlite_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(sqlite_url)
    upgrade(engine)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture(scope="module")
def random_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from triaged.ml.api import build_random_model_dir

    return build_random_model_dir(tmp_path_factory.mktemp("model") / "random", seed=0)


def _uid(paths: list[Path]) -> str:
    return str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)


def _series_state(factory: sessionmaker[Session], uid: str) -> Series | None:
    with factory() as session:
        return session.scalar(select(Series).where(Series.series_instance_uid == uid))


def _cam_shapes(factory: sessionmaker[Session], result: Result, storage: Path) -> list[tuple[int, ...]]:
    with factory() as session:
        rows = session.scalars(
            select(SlicePrediction).where(SlicePrediction.result_id == result.id, SlicePrediction.cam_path.is_not(None))
        ).all()
        return [np.load(storage / str(r.cam_path)).shape for r in rows]


def test_serve_processes_series_end_to_end(
    tmp_path: Path, sqlite_url: str, sqlite_factory: sessionmaker[Session], random_model: Path
) -> None:
    config = daemon_config(tmp_path, db_url=sqlite_url, model_dir=random_model, dicom_port=0)
    labelled = {
        label: labelled_series(tmp_path / label, kaggle_files(label)[:3], seed=f"e2e-{label}")
        for label in ("glioma", "meningioma", "pituitary", "notumor")
    }
    dwi = sorted((shared_data() / "dicom" / TOSHIBA_DWI).iterdir())
    rng = np.random.default_rng(0)
    ct = write_mr_series([rng.random((16, 16)) for _ in range(2)], tmp_path / "ct", modality="CT", seed="e2e-ct")
    with running_daemon(config, log_path=tmp_path / "serve.log") as daemon:
        assert daemon.dicom_port is not None and daemon.http_port is not None
        wait_for(lambda: daemon.http_get("/readyz")[0] == 200, timeout=30, what="readyz")
        status, body = daemon.http_get("/readyz")
        assert json.loads(body)["checks"] == {"database": "ok", "schema": "ok", "model": "ok", "receiver": "ok"}
        assert daemon.http_get("/healthz") == (200, "ok\n")
        for paths in [*labelled.values(), dwi, ct]:
            send_series(daemon.dicom_port, paths)
        mr_uids = [_uid(p) for p in labelled.values()] + [_uid(dwi)]
        wait_for(
            lambda: all(len(results_for(sqlite_factory, uid)) == 1 for uid in mr_uids),
            timeout=90,
            what="one result per MR series",
        )
        storage = tmp_path / "data" / "storage"
        for label, paths in labelled.items():
            [result] = results_for(sqlite_factory, _uid(paths))
            shape = pydicom.dcmread(paths[0]).pixel_array.shape
            assert result.status == ResultStatus.ASSESSED, (label, result.reason)
            assert all(s == shape for s in _cam_shapes(sqlite_factory, result, storage))
            assert len(_cam_shapes(sqlite_factory, result, storage)) >= 1
        [dwi_result] = results_for(sqlite_factory, _uid(dwi))
        assert dwi_result.status == ResultStatus.NOT_ASSESSABLE and not dwi_result.urgent
        wait_for(
            lambda: (s := _series_state(sqlite_factory, _uid(ct))) is not None and s.state == SeriesState.SKIPPED,
            timeout=30,
            what="non-MR series skipped",
        )
        skipped = _series_state(sqlite_factory, _uid(ct))
        assert skipped is not None and skipped.skip_reason and "CT" in skipped.skip_reason
        assert results_for(sqlite_factory, _uid(ct)) == []

        # a late instance re-opens the series (generation 2) and it is processed again; the old result stays
        first = labelled["glioma"]
        late = write_mr_series(
            [load_slice(kaggle_files("glioma")[5])],
            tmp_path / "late",
            series_instance_uid=_uid(first),
            study_instance_uid=str(pydicom.dcmread(first[0]).StudyInstanceUID),
            seed="e2e-late",
        )
        send_series(daemon.dicom_port, late)
        wait_for(lambda: len(results_for(sqlite_factory, _uid(first))) == 2, timeout=60, what="generation 2 result")
        old, new = results_for(sqlite_factory, _uid(first))
        assert (old.generation, new.generation) == (1, 2)

        status, metrics_text = daemon.http_get("/metrics")
        assert status == 200
        assert "triaged_instances_received_total" in metrics_text
        inference_count = next(
            float(line.split()[-1])
            for line in metrics_text.splitlines()
            if line.startswith("triaged_inference_seconds_count")
        )
        assert inference_count >= 5
        code = daemon.terminate()
    assert code == 0
    log = daemon.log_text()
    assert '"daemon_started"' in log and '"daemon_stopped"' in log


def test_readyz_answers_503_while_the_schema_is_not_current(
    tmp_path: Path, sqlite_url: str, random_model: Path
) -> None:
    """The schema is migrated away under a running daemon (as another host's `db` command would): /readyz
    turns 503 and names the fix, /healthz stays 200, and the probe is ready again once upgraded."""
    from triaged.db.schema import downgrade

    engine = make_engine(sqlite_url)
    upgrade(engine)
    config = daemon_config(tmp_path, db_url=sqlite_url, model_dir=random_model, dicom_port=0, workers=0)
    try:
        with running_daemon(config, log_path=tmp_path / "serve.log") as daemon:
            wait_for(lambda: daemon.http_get("/readyz")[0] == 200, timeout=30, what="ready")
            downgrade(engine, "base")
            status, body = daemon.http_get("/readyz")
            assert status == 503, body
            answer = json.loads(body)
            assert answer["ready"] is False and answer["checks"]["database"] == "ok"
            assert answer["checks"]["schema"].startswith("SchemaOutdatedError: database schema is empty")
            assert "triaged db upgrade" in answer["checks"]["schema"]
            assert daemon.http_get("/healthz") == (200, "ok\n")  # alive, just not ready
            upgrade(engine)
            status, body = daemon.http_get("/readyz")
            assert status == 200 and json.loads(body)["ready"] is True, body
    finally:
        engine.dispose()


def _serve_expecting_failure(config: Path) -> subprocess.CompletedProcess[str]:
    """Run `triaged serve` that must refuse to start: exit 1 with a one-line error, never a traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "triaged", "-c", str(config), "serve"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    return proc


def test_serve_refuses_old_schema(tmp_path: Path, random_model: Path) -> None:
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    config = daemon_config(tmp_path, db_url=url, model_dir=random_model, dicom_port=0)
    proc = _serve_expecting_failure(config)
    assert proc.stderr.strip().splitlines()[-1].startswith("error: database schema is empty")
    assert "triaged db upgrade" in proc.stderr


def test_cli_jobs_results_retry_purge(
    tmp_path: Path, sqlite_url: str, sqlite_factory: sessionmaker[Session], random_model: Path
) -> None:
    config = daemon_config(tmp_path, db_url=sqlite_url, model_dir=random_model, dicom_port=0)
    paths = labelled_series(tmp_path / "s", kaggle_files("pituitary")[:2], seed="e2e-cli")
    with running_daemon(config, log_path=tmp_path / "serve.log") as daemon:
        assert daemon.dicom_port is not None
        send_series(daemon.dicom_port, paths)
        wait_for(lambda: len(results_for(sqlite_factory, _uid(paths))) == 1, timeout=60, what="result")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "triaged", "-c", str(config), *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    listed = cli("jobs", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    jobs = json.loads(listed.stdout)
    assert [(j["kind"], j["state"]) for j in jobs] == [("infer", "done")]
    shown = cli("results", "show", _uid(paths), "--json")
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    assert data["state"] == "done" and len(data["results"]) == 1
    assert len(data["results"][0]["slices"]) == 2
    unknown = cli("results", "show", "1.2.3.4")
    assert unknown.returncode == 1 and unknown.stderr.strip() == "error: no series with SeriesInstanceUID 1.2.3.4"
    assert cli("retry").returncode == 2
    assert cli("reprocess").returncode == 2
    other = tmp_path / "other-model"
    from triaged.ml.api import build_random_model_dir

    build_random_model_dir(other, seed=7)
    queued = cli("reprocess", _uid(paths), "--model", str(other), "--json")
    assert queued.returncode == 0, queued.stderr
    assert len(json.loads(queued.stdout)["queued"]) == 1
    purged = cli("purge", "--older-than-days", "0", "--json")
    assert purged.returncode == 0, purged.stderr
    assert json.loads(purged.stdout) == {"purged": 0}  # the series has an active reprocess job: files kept


PROBE_CHUNK = 12  # slices per in-process probe step; most classes are settled by the first chunk
PROBE_MAX = 48  # clean Kaggle test images per class looked at, at most
STALL_SECONDS = 240.0  # no new result for this long: the daemon is stuck (a slow machine still progresses)


def _confident_slices(triage: Any, label: str, meta: Any, wanted: int = 3) -> list[str]:
    """Up to ``wanted`` of the first PROBE_MAX clean test images of ``label`` that the model, given the image
    directly, classifies as ``label`` with margin (p >= 0.6, 0.3 above the next class); probed in chunks."""
    files = kaggle_files(label)[:PROBE_MAX]
    column = triage.classes.index(label)
    confident: list[str] = []
    for start in range(0, len(files), PROBE_CHUNK):
        chunk = files[start : start + PROBE_CHUNK]
        probe = triage.assess([load_slice(f) for f in chunk], meta, cam_top_k=0)
        for name, row, in_brain in zip(chunk, probe.slice_probabilities, probe.slice_in_brain, strict=True):
            others = np.delete(row, column)
            if in_brain and row[column] >= 0.6 and row[column] - others.max() >= 0.3:
                confident.append(name)
        if len(confident) >= wanted:
            break
    return confident[:wanted]


def _wait_while_progressing(progress: Callable[[], int], target: int, *, stall: float, what: str) -> None:
    """Wait until ``progress()`` reaches ``target``; fail only when it stops moving for ``stall`` seconds, so a
    slow (loaded) machine passes and a hung daemon still fails long before the test's own timeout."""
    last, moved = progress(), time.monotonic()
    while last < target:
        time.sleep(0.5)
        now = progress()
        if now != last:
            last, moved = now, time.monotonic()
        elif time.monotonic() - moved > stall:
            raise AssertionError(f"{what}: stuck at {last}/{target} for {stall:.0f} s")


@pytest.mark.slow
@pytest.mark.timeout(1200)  # its own budget, sized for a busy 2-core machine, not the suite's 300 s default
@pytest.mark.skipif(not shipped_model_available(), reason="models/densenet121-brainmri-v2 not shipped")
def test_shipped_model_labels_and_normal_brains(
    tmp_path: Path, sqlite_url: str, sqlite_factory: sessionmaker[Session]
) -> None:
    """Labelled series get the expected label; the two real normal T1 series are assessed (and not urgent).

    Slices are chosen, among the first 48 clean Kaggle test images of each class, as those the shipped
    model itself classifies correctly with margin (p >= 0.6, 0.3 above the next class) when given the
    image directly: this checks that the DICOM path (wrapping, decoding, preprocessing, aggregation)
    preserves the model's answer, not the model's accuracy (that is the evaluation report's job).
    """
    from triaged.ml.api import SeriesMeta, Triage

    triage = Triage(SHIPPED_MODEL, device="cpu", precision="fp32", threads=1)
    meta = SeriesMeta("MR", "BRAIN", "T1 AX POST GD", "", ("ORIGINAL", "PRIMARY"), ("SE",), ("NONE",), (), 48)
    chosen: dict[str, list[str]] = {}
    for label in ("glioma", "meningioma", "pituitary", "notumor"):
        chosen[label] = _confident_slices(triage, label, meta)
        assert chosen[label], f"the shipped model classifies none of {PROBE_MAX} clean {label} slices with margin"
    del triage

    config = daemon_config(tmp_path, db_url=sqlite_url, model_dir=SHIPPED_MODEL, dicom_port=0)
    series = {
        label: labelled_series(tmp_path / label, files, seed=f"shipped-{label}") for label, files in chosen.items()
    }
    uih = sorted((shared_data() / "dicom" / UIH_T1).iterdir())
    xa30 = sorted((shared_data() / "dicom" / XA30_MPRAGE).iterdir())
    with running_daemon(config, log_path=tmp_path / "serve.log") as daemon:
        assert daemon.dicom_port is not None
        for paths in [*series.values(), uih, xa30]:
            send_series(daemon.dicom_port, paths)
        uids = [_uid(p) for p in [*series.values(), uih, xa30]]
        _wait_while_progressing(
            lambda: sum(bool(results_for(sqlite_factory, u)) for u in uids),
            len(uids),
            stall=STALL_SECONDS,
            what="results",
        )
    for label, paths in series.items():
        [result] = results_for(sqlite_factory, _uid(paths))
        assert result.status == ResultStatus.ASSESSED
        assert result.label == label, (label, result.probabilities)
        assert result.urgent == (label != "notumor"), (label, result.urgency, result.threshold)
    normals = [results_for(sqlite_factory, _uid(p))[0] for p in (uih, xa30)]
    assert all(r.status == ResultStatus.ASSESSED for r in normals), [r.reason for r in normals]
    flagged = [(r.label, round(r.urgency or 0, 3)) for r in normals if r.urgent]
    assert not flagged, f"normal T1 brain series flagged urgent: {flagged}"


def test_config_writer_round_trip(tmp_path: Path) -> None:
    import tomllib

    path = write_config(tmp_path / "c.toml", {"data_dir": "/x", "worker": {"count": 2, "lease_seconds": 1.5}})
    assert tomllib.loads(path.read_text()) == {"data_dir": "/x", "worker": {"count": 2, "lease_seconds": 1.5}}


@pytest.mark.slow
def test_sigterm_mid_job_finishes_the_job_and_exits_zero(
    tmp_path: Path, sqlite_url: str, sqlite_factory: sessionmaker[Session], random_model: Path
) -> None:
    """SIGTERM lands while a job runs: /readyz says 503 at once, the job finishes, then exit 0.

    The job is held mid-run by ``worker.hold_file`` until the test has seen the signal arrive, so the
    order cannot depend on how fast the model is or how busy the machine is.
    """
    hold = tmp_path / "release-the-job"
    config = daemon_config(
        tmp_path, db_url=sqlite_url, model_dir=random_model, dicom_port=0, worker={"hold_file": str(hold)}
    )
    paths = labelled_series(tmp_path / "s", kaggle_files("glioma")[:3], seed="sigterm")
    with running_daemon(config, log_path=tmp_path / "serve.log") as daemon:
        assert daemon.dicom_port is not None
        send_series(daemon.dicom_port, paths)
        wait_for(lambda: '"job_held"' in daemon.log_text(), timeout=60, what="job held mid-run")
        [job] = jobs_for(sqlite_factory, _uid(paths))
        assert job.state == JobState.RUNNING
        daemon.proc.send_signal(signal.SIGTERM)
        wait_for(lambda: daemon.http_get("/readyz")[0] == 503, timeout=30, what="/readyz 503 while stopping")
        status, body = daemon.http_get("/readyz")
        assert status == 503
        answer = json.loads(body)
        assert answer["ready"] is False and answer["checks"]["shutdown"] == "stopping", answer
        assert '"signal_received"' in daemon.log_text()
        assert results_for(sqlite_factory, _uid(paths)) == []  # still held: the signal came mid-job
        hold.touch()
        assert daemon.terminate(timeout=90) == 0
    [result] = results_for(sqlite_factory, _uid(paths))  # the current job was allowed to finish
    assert result.status == ResultStatus.ASSESSED
    [job] = jobs_for(sqlite_factory, _uid(paths))
    assert job.state == JobState.DONE and job.attempts == 1
    log = daemon.log_text()
    assert log.index('"signal_received"') < log.index('"job_hold_released"') < log.index('"series_processed"')
    assert log.index('"series_processed"') < log.index('"daemon_stopped"')


def test_serve_port_in_use_is_one_line_error(
    tmp_path: Path, sqlite_url: str, sqlite_factory: sessionmaker[Session]
) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        config = daemon_config(
            tmp_path, db_url=sqlite_url, model_dir=tmp_path, dicom_port=busy.getsockname()[1], workers=0
        )
        proc = _serve_expecting_failure(config)
    assert proc.stderr.strip().splitlines()[-1] == "error: cannot start: Address already in use"


def test_retention_purge_deletes_received_files_keeps_results(
    tmp_path: Path, sqlite_url: str, sqlite_factory: sessionmaker[Session], random_model: Path
) -> None:
    from triaged.db.models import Instance

    config = daemon_config(
        tmp_path,
        db_url=sqlite_url,
        model_dir=random_model,
        dicom_port=0,
        storage={"retention_days": 3 / 86400},  # 3 s
    )
    paths = labelled_series(tmp_path / "s", kaggle_files("notumor")[:2], seed="e2e-retention")
    with running_daemon(config, log_path=tmp_path / "serve.log") as daemon:
        assert daemon.dicom_port is not None
        send_series(daemon.dicom_port, paths)
        wait_for(lambda: len(results_for(sqlite_factory, _uid(paths))) == 1, timeout=60, what="result")

        def purged() -> list[Instance]:
            with sqlite_factory() as session:
                return list(session.scalars(select(Instance).where(Instance.purged_at.is_not(None))))

        wait_for(lambda: len(purged()) == 2, timeout=30, what="received files purged")
    storage = tmp_path / "data" / "storage"
    assert all(not (storage / i.file_path).exists() for i in purged())
    assert len(results_for(sqlite_factory, _uid(paths))) == 1
