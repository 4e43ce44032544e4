"""Several `triaged worker` processes against one database: crash recovery and exactly-once processing.

`triaged serve --workers 0` receives and sweeps (and reaps leases); separate worker processes process.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

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
    """The victim is killed while it holds the job (``worker.hold_file``: the job cannot finish first, however
    fast the machine); a second worker runs it again, and only after the victim's lease ran out.

    Attempt 1's lease expiry is read from the database once nothing alive can change it (serve stopped, the
    victim dead, the rescuer not started). The victim's lease (15 s) outlasts the rescuer's start-up, and the
    rescuer reaps every second (reaper interval = its lease / 2), so a reaper that re-queued a live lease early
    would do so before the expiry and fail the comparison below.
    """
    from triaged.ml.api import build_random_model_dir

    model = build_random_model_dir(tmp_path / "model", seed=0)
    hold = tmp_path / "release-jobs"
    victim_lease = 15.0
    config = daemon_config(
        tmp_path,
        db_url=db_url,
        model_dir=model,
        dicom_port=0,
        workers=0,
        worker={"lease_seconds": victim_lease, "heartbeat_seconds": 0.5, "hold_file": str(hold)},
    )
    paths = labelled_series(tmp_path / "s", kaggle_files("glioma")[:3], seed="kill9")
    with running_daemon(config, log_path=tmp_path / "serve.log") as serve:
        assert serve.dicom_port is not None
        victim = start_daemon(config, ("worker",), log_path=tmp_path / "victim.log")
        try:
            send_series(serve.dicom_port, paths)
            wait_for(lambda: '"job_held"' in victim.log_text(), timeout=60, what="job held by the victim")
            [job] = _infer_jobs(factory)
            assert job.state == JobState.RUNNING and _pid(job.lease_owner) == victim.proc.pid
            assert serve.terminate() == 0  # serve reaps too: after the kill, only the rescuer touches the job
            victim.kill9()
        finally:
            victim.kill9()
    [killed] = _infer_jobs(factory)
    assert (killed.state, killed.attempts, count(factory, Result)) == (JobState.RUNNING, 1, 0)
    assert killed.lease_expires_at is not None
    first_lease_expiry = killed.lease_expires_at  # final: its holder is dead and no reaper runs yet
    hold.touch()
    rescuer_config = daemon_config(
        tmp_path,
        db_url=db_url,
        model_dir=model,
        dicom_port=0,
        workers=1,
        worker={"lease_seconds": 2.0, "heartbeat_seconds": 0.5},
    )
    with running_daemon(rescuer_config, ("worker",), log_path=tmp_path / "rescuer.log") as rescuer:
        wait_for(lambda: count(factory, Result) == 1, timeout=100, what="result after lease expiry")
        [job] = _infer_jobs(factory)
        assert job.state == JobState.DONE
        assert job.attempts == 2
        assert _pid(job.lease_owner) == rescuer.proc.pid
    # the reaper re-queued it at run_after, and a claim needs run_after <= its own time: attempt 2 was claimed
    # after attempt 1's lease had run out
    assert first_lease_expiry < job.run_after, (first_lease_expiry, job.run_after)
    assert job.heartbeat_at is not None and job.run_after <= job.heartbeat_at
    assert count(factory, Result) == 1
    assert "job_lease_expired" in (tmp_path / "rescuer.log").read_text()


@pytest.mark.parametrize(
    ("db_url", "processes"),
    [pytest.param("postgres", 3, marks=pytest.mark.postgres), ("sqlite", 2)],
    indirect=["db_url"],
)
def test_worker_processes_process_each_series_exactly_once(
    tmp_path: Path, db_url: str, processes: int, factory: sessionmaker[Session]
) -> None:
    """Every worker process holds its first job (``worker.hold_file``) until all of them hold one, so the
    work is shared by construction, not by the scheduler; then they drain the queue and stop cleanly."""
    from triaged.ml.api import build_random_model_dir

    model = build_random_model_dir(tmp_path / "model", seed=0)
    hold = tmp_path / "release-jobs"
    config = daemon_config(
        tmp_path, db_url=db_url, model_dir=model, dicom_port=0, workers=0, worker={"hold_file": str(hold)}
    )
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

            def holders() -> set[int]:
                return {_pid(j.lease_owner) for j in _infer_jobs(factory) if j.state == JobState.RUNNING}

            wait_for(lambda: len(holders()) == processes, timeout=100, what="every worker holding a job")
            assert holders() == {w.proc.pid for w in workers}
            hold.touch()
            wait_for(lambda: count(factory, Result) >= 30, timeout=100, what="30 results")
            # a graceful stop waits for jobs in flight: once all have exited, no duplicate attempt can still surface
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
    assert {_pid(j.lease_owner) for j in jobs} == {w.proc.pid for w in workers}
