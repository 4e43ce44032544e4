"""Several `triaged worker` processes against one database: crash recovery and exactly-once processing.

`triaged serve --workers 0` receives and sweeps (and reaps leases); separate worker processes process.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from tests.conftest import free_port
from tests.support.pipeline_daemon import daemon_config, running_daemon, send_series, start_daemon
from tests.support.pipeline_support import count, kaggle_files, labelled_series, wait_for
from triaged.db.engine import make_engine, make_session_factory
from triaged.db.models import Job, JobKind, JobState, Result
from triaged.db.schema import upgrade
from triaged.dicom.synthetic import write_mr_series

pytestmark = [
    pytest.mark.slow,
]


@pytest.fixture
def factory(db_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(db_url)
    upgrade(engine)
    yield make_session_factory(engine)
    engine.dispose()


def _infer_jobs(factory: sessionmaker[Session]) -> list[Job]:
    with factory() as session:
        return list(session.scalars(select(Job).where(Job.kind == JobKind.INFER).order_by(Job.id)))


def _pid(worker_id: str | None) -> int:
    return int(str(worker_id).split(":")[1])


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_kill_9_mid_job_another_worker_finishes_it(tmp_path: Path, db_url: str, factory: sessionmaker[Session]) -> None:
    from triaged.ml.api import build_random_model_dir

    # a full-size DenseNet121 on a 64-slice series: seconds of work, long enough to kill it mid-job
    model = build_random_model_dir(tmp_path / "slow-model", seed=0, arch="densenet121", input_size=128)
    config = daemon_config(
        tmp_path,
        db_url=db_url,
        model_dir=model,
        dicom_port=free_port(),
        workers=0,
        worker={"lease_seconds": 4.0, "heartbeat_seconds": 1.0},
    )
    files = (kaggle_files("glioma") * 3)[:64]
    paths = labelled_series(tmp_path / "big", files, seed="kill9", size=(128, 128))
    with running_daemon(config, log_path=tmp_path / "serve.log") as serve:
        assert serve.dicom_port is not None
        victim = start_daemon(config, ("worker",), log_path=tmp_path / "victim.log")
        try:
            send_series(serve.dicom_port, paths)
            wait_for(
                lambda: any(j.state == JobState.RUNNING for j in _infer_jobs(factory)),
                timeout=60,
                what="job running in the victim",
            )
            [job] = _infer_jobs(factory)
            assert _pid(job.lease_owner) == victim.proc.pid
            victim.kill9()
        finally:
            victim.kill9()
        assert count(factory, Result) == 0, "the job finished before it could be killed; make it slower"
        killed_at = time.monotonic()
        with running_daemon(config, ("worker",), log_path=tmp_path / "rescuer.log") as rescuer:
            wait_for(lambda: count(factory, Result) == 1, timeout=100, what="result after lease expiry")
            [job] = _infer_jobs(factory)
            assert job.state == JobState.DONE
            assert job.attempts == 2
            assert _pid(job.lease_owner) == rescuer.proc.pid
        assert time.monotonic() - killed_at >= 3.0  # not before the lease (4 s) ran out
    assert count(factory, Result) == 1
    assert "job_lease_expired" in (tmp_path / "serve.log").read_text() + (tmp_path / "rescuer.log").read_text()


@pytest.mark.parametrize(
    ("db_url", "processes"),
    [pytest.param("postgres", 3, marks=pytest.mark.postgres), ("sqlite", 2)],
    indirect=["db_url"],
)
def test_worker_processes_process_each_series_exactly_once(
    tmp_path: Path, db_url: str, processes: int, factory: sessionmaker[Session]
) -> None:
    from triaged.ml.api import build_random_model_dir

    model = build_random_model_dir(tmp_path / "model", seed=0)
    config = daemon_config(tmp_path, db_url=db_url, model_dir=model, dicom_port=free_port(), workers=0)
    rng = np.random.default_rng(0)
    series = [
        write_mr_series([rng.random((32, 32)) for _ in range(2)], tmp_path / f"s{i}", seed=f"many-{i}")
        for i in range(30)
    ]
    with running_daemon(config, log_path=tmp_path / "serve.log") as serve:
        assert serve.dicom_port is not None
        workers = [start_daemon(config, ("worker",), log_path=tmp_path / f"worker{i}.log") for i in range(processes)]
        try:
            send_series(serve.dicom_port, [p for paths in series for p in paths])
            wait_for(lambda: count(factory, Result) >= 30, timeout=100, what="30 results")
            time.sleep(1.0)  # let any duplicate attempt surface before checking
            codes = [w.terminate() for w in workers]
        finally:
            for w in workers:
                w.kill9()
    assert codes == [0] * processes
    jobs = _infer_jobs(factory)
    assert len(jobs) == 30
    assert all(j.state == JobState.DONE and j.attempts == 1 for j in jobs), [(j.state, j.attempts) for j in jobs]
    with factory() as session:
        series_ids = list(session.scalars(select(Result.series_id)))
    assert len(series_ids) == 30 and len(set(series_ids)) == 30
    owners = {_pid(j.lease_owner) for j in jobs}
    assert owners <= {w.proc.pid for w in workers}
    assert len(owners) >= 2, "the work was not shared between worker processes"
