"""Worker loop against a real database: heartbeats keep long jobs, failures map to states, shutdown releases."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from tests.support.pipeline_support import wait_for
from triaged.config import Settings
from triaged.db import queue
from triaged.db.models import Job, JobKind, JobState
from triaged.errors import InferenceError, PixelDecodeError
from triaged.receive.storage import InstanceStore
from triaged.runtime import Runtime
from triaged.worker import Worker, start_worker_threads, stop_workers


@pytest.fixture
def runtime(make_settings: Callable[..., Settings], session_factory: sessionmaker[Session], tmp_path: Path) -> Runtime:
    settings = make_settings(
        worker={
            "lease_seconds": 2.0,
            "heartbeat_seconds": 0.2,
            "poll_seconds": 0.05,
            "backoff_base_seconds": 0.01,
            "backoff_max_seconds": 0.02,
        },
        storage={"min_free_bytes": 0},
    )
    return Runtime(settings, session_factory, InstanceStore(tmp_path / "store", 0), None)


def _add(runtime: Runtime, key: str, max_attempts: int = 3) -> int:
    with runtime.session_factory.begin() as session:
        job = queue.enqueue(session, JobKind.INFER, dedupe_key=key, max_attempts=max_attempts)
        assert job is not None
        return job.id


def _job(runtime: Runtime, job_id: int) -> Job:
    with runtime.session_factory() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def _completing(seconds: float) -> Callable[[Runtime, Job], None]:
    def handler(runtime: Runtime, job: Job) -> None:
        time.sleep(seconds)
        with runtime.session_factory.begin() as session:
            queue.complete(session, job.id, str(job.lease_owner))

    return handler


def _lease_expiry(runtime: Runtime, job_id: int) -> datetime:
    expiry = _job(runtime, job_id).lease_expires_at
    assert expiry is not None
    return expiry


def test_heartbeat_keeps_a_job_longer_than_its_lease(runtime: Runtime) -> None:
    """Each heartbeat moves the lease on: a reaper run at a time past the lease the job had before that
    heartbeat leaves it alone. Time is passed to the reaper (``now=``), so no wall-clock race is involved;
    the control job (same lease, no heartbeat) is reaped at the same instants."""
    control_id = _add(runtime, "control")
    job_id = _add(runtime, "long")
    control = queue.claim(runtime.session_factory, worker_id="c", kinds=[JobKind.INFER], lease_seconds=2.0)
    assert control is not None and control.id == control_id
    extensions: list[tuple[datetime, datetime]] = []
    reaped_control: list[int] = []

    def handler(runtime: Runtime, job: Job) -> None:
        previous = _lease_expiry(runtime, job.id)
        for _ in range(3):
            wait_for(lambda: _lease_expiry(runtime, job.id) > previous, timeout=60, what="lease extended")  # noqa: B023
            extended = _lease_expiry(runtime, job.id)
            past_previous = previous + (extended - previous) / 2
            reaped_control.append(queue.reap_expired_leases(runtime.session_factory, now=past_previous))
            extensions.append((previous, extended))
            previous = extended
        with runtime.session_factory.begin() as session:
            queue.complete(session, job.id, str(job.lease_owner))

    job = queue.claim(runtime.session_factory, worker_id="w", kinds=[JobKind.INFER], lease_seconds=2.0)
    assert job is not None and job.id == job_id
    state = Worker(runtime, worker_id="w", stop=threading.Event(), kinds=[JobKind.INFER], handler=handler).run_job(job)
    assert state == JobState.DONE
    assert len(extensions) == 3 and all(new > old for old, new in extensions)
    assert reaped_control == [1, 0, 0]  # the control job's lease ran out at the first reap; the held job's never
    done = _job(runtime, job_id)
    assert done.state == JobState.DONE and done.attempts == 1 and done.last_error is None
    reaped = _job(runtime, control_id)
    assert reaped.state == JobState.QUEUED and reaped.last_error == "LeaseExpiredError: lease of c expired"


def test_failures_map_to_states(runtime: Runtime) -> None:
    errors: dict[str, BaseException] = {
        "perm": PixelDecodeError("colour image"),
        "retry": InferenceError("out of memory"),
        "unknown": KeyError("x"),
    }

    def handler(runtime: Runtime, job: Job) -> None:
        raise errors[job.dedupe_key]

    ids = {key: _add(runtime, key, max_attempts=2) for key in errors}
    worker = Worker(runtime, worker_id="w", stop=threading.Event(), kinds=[JobKind.INFER], handler=handler)
    runs = 0
    while runs < 10:
        # claim as of one second ahead: past any retry's backoff (at most 20 ms here), without sleeping for it
        ahead = datetime.now(UTC) + timedelta(seconds=1)
        job = queue.claim(runtime.session_factory, worker_id="w", kinds=[JobKind.INFER], lease_seconds=5, now=ahead)
        if job is None:
            break
        worker.run_job(job)
        runs += 1
    assert runs == 5  # perm once, retry and unknown twice each
    assert _job(runtime, ids["perm"]).state == JobState.FAILED
    assert _job(runtime, ids["perm"]).attempts == 1
    for key in ("retry", "unknown"):
        job = _job(runtime, ids[key])
        assert job.state == JobState.DEAD and job.attempts == 2
    assert _job(runtime, ids["unknown"]).last_error == "KeyError: 'x'"


def test_worker_threads_drain_queue_and_shutdown_releases_overrunning_job(runtime: Runtime) -> None:
    quick = [_add(runtime, f"q{i}") for i in range(6)]
    stop = threading.Event()
    blocker = threading.Event()

    def handler(runtime: Runtime, job: Job) -> None:
        if job.dedupe_key == "stuck":
            blocker.wait(30)
            return
        _completing(0.0)(runtime, job)

    workers = []
    for index in range(2):
        worker = Worker(runtime, worker_id=f"w{index}", stop=stop, kinds=[JobKind.INFER], handler=handler)
        thread = threading.Thread(target=worker.run, daemon=True)
        thread.start()
        workers.append((worker, thread))
    deadline = time.monotonic() + 30
    while any(_job(runtime, j).state != JobState.DONE for j in quick) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(_job(runtime, j).state == JobState.DONE for j in quick)
    stuck = _add(runtime, "stuck")
    # stop_workers releases the job a worker holds in memory; that is set just after the claim commits RUNNING.
    wait_for(lambda: any(worker.current_job_id == stuck for worker, _ in workers), timeout=30, what="stuck job held")
    stop.set()
    stop_workers(runtime, workers, grace_seconds=0.5)
    released = _job(runtime, stuck)
    assert released.state == JobState.QUEUED and released.lease_owner is None and released.attempts == 0
    blocker.set()


def test_start_worker_threads_uses_default_dispatch(runtime: Runtime) -> None:
    stop = threading.Event()
    workers = start_worker_threads(runtime, 1, stop)
    assert workers[0][0].kinds[0] == JobKind.INFER
    stop.set()
    stop_workers(runtime, workers, grace_seconds=5)
    assert not workers[0][1].is_alive()


def test_hold_file_holds_a_claimed_job_with_its_lease_alive(
    make_settings: Callable[..., Settings], session_factory: sessionmaker[Session], tmp_path: Path
) -> None:
    """The testing-only ``worker.hold_file``: the handler does not start before the file exists, and the
    heartbeat keeps the lease meanwhile (what the SIGTERM and kill -9 tests rely on)."""
    hold = tmp_path / "go"
    settings = make_settings(
        worker={"lease_seconds": 2.0, "heartbeat_seconds": 0.1, "poll_seconds": 0.02, "hold_file": hold},
        storage={"min_free_bytes": 0},
    )
    runtime = Runtime(settings, session_factory, InstanceStore(tmp_path / "store", 0), None)
    job_id = _add(runtime, "held")
    started = threading.Event()

    def handler(runtime: Runtime, job: Job) -> None:
        started.set()
        _completing(0.0)(runtime, job)

    job = queue.claim(runtime.session_factory, worker_id="w", kinds=[JobKind.INFER], lease_seconds=2.0)
    assert job is not None
    first_expiry = _lease_expiry(runtime, job_id)
    worker = Worker(runtime, worker_id="w", stop=threading.Event(), kinds=[JobKind.INFER], handler=handler)
    states: list[JobState] = []
    thread = threading.Thread(target=lambda: states.append(worker.run_job(job)))
    thread.start()
    try:
        wait_for(lambda: _lease_expiry(runtime, job_id) > first_expiry, timeout=60, what="lease extended while held")
        assert not started.is_set() and _job(runtime, job_id).state == JobState.RUNNING
    finally:
        hold.touch()
        thread.join(60)
    assert started.is_set() and states == [JobState.DONE]


def test_exports_get_their_own_worker_slots(runtime: Runtime) -> None:
    stop = threading.Event()
    workers = start_worker_threads(runtime, 2, stop, export_count=1)
    assert [worker.kinds for worker, _ in workers] == [(JobKind.INFER,), (JobKind.INFER,), (JobKind.EXPORT,)]
    assert len({worker.worker_id for worker, _ in workers}) == 3
    stop.set()
    stop_workers(runtime, workers, grace_seconds=5)
    assert not any(thread.is_alive() for _, thread in workers)
