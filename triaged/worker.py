"""Queue workers: claim a job, heartbeat its lease while the handler runs, record success or failure.

A handler (``Callable[[Runtime, Job], None]``) does its slow work outside any transaction and completes
the job itself inside the transaction that writes its rows (:func:`triaged.db.queue.complete`). The
worker only decides what a failure means, from the exception type (style P3), via :func:`queue.fail`.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence

import structlog

from triaged import metrics
from triaged.db import audit, destinations, queue, repo
from triaged.db.models import Job, JobKind, JobState
from triaged.errors import DestinationDownError
from triaged.outputs.destinations import probe_delay
from triaged.runtime import Runtime

log = structlog.get_logger()

Handler = Callable[[Runtime, Job], None]


def export_available() -> bool:
    """The outputs step lands separately; export jobs are only claimed once its module exists."""
    return importlib.util.find_spec("triaged.export") is not None


def default_kinds() -> tuple[JobKind, ...]:
    return (JobKind.INFER, JobKind.EXPORT) if export_available() else (JobKind.INFER,)


def dispatch(runtime: Runtime, job: Job) -> None:
    """Run the handler for ``job.kind`` (imported lazily: the export module may land later)."""
    if job.kind == JobKind.INFER:
        from triaged.pipeline import run_infer_job

        run_infer_job(runtime, job)
    elif job.kind == JobKind.EXPORT and "notify" in job.payload:
        from triaged.notify import run_notify_job

        run_notify_job(runtime, job)
    elif job.kind == JobKind.EXPORT:
        from triaged.export import run_export_job  # type: ignore[import-not-found,unused-ignore]

        run_export_job(runtime, job)
    else:  # pragma: no cover - the enum is closed
        raise ValueError(f"no handler for job kind {job.kind}")


def make_worker_id(index: int = 0) -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{index}"


class _Heartbeat:
    """Extends the lease every ``interval`` seconds on its own thread; notices when the lease was lost."""

    def __init__(self, runtime: Runtime, job_id: int, worker_id: str) -> None:
        self._runtime = runtime
        self._job_id = job_id
        self._worker_id = worker_id
        self._stop = threading.Event()
        self.lost = False
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id}", daemon=True)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        settings = self._runtime.settings.worker
        while not self._stop.wait(settings.heartbeat_seconds):
            try:
                ok = queue.heartbeat(
                    self._runtime.session_factory, self._job_id, self._worker_id, settings.lease_seconds
                )
            except Exception as exc:  # a DB hiccup must not kill the heartbeat; the lease has slack
                log.warning("job_heartbeat_failed", job_id=self._job_id, error=queue.error_line(exc))
                continue
            if not ok:
                self.lost = True
                log.warning("job_lease_lost", job_id=self._job_id)
                return


class Worker:
    """One claim-run loop; run several on threads (``serve``) or processes (``worker``)."""

    def __init__(
        self,
        runtime: Runtime,
        *,
        worker_id: str,
        stop: threading.Event,
        kinds: Sequence[JobKind] | None = None,
        handler: Handler = dispatch,
    ) -> None:
        self.runtime = runtime
        self.worker_id = worker_id
        self.stop = stop
        self.kinds = tuple(kinds) if kinds is not None else default_kinds()
        self.handler = handler
        self.current_job_id: int | None = None
        self.jobs_done = 0

    def run(self) -> None:
        settings = self.runtime.settings.worker
        log.info("worker_started", worker=self.worker_id, kinds=[str(k) for k in self.kinds])
        while not self.stop.is_set():
            try:
                job = queue.claim(
                    self.runtime.session_factory,
                    worker_id=self.worker_id,
                    kinds=self.kinds,
                    lease_seconds=settings.lease_seconds,
                )
            except Exception as exc:  # database briefly unavailable: back off, keep the loop alive
                log.warning("job_claim_failed", worker=self.worker_id, error=queue.error_line(exc))
                self.stop.wait(settings.poll_seconds * 4)
                continue
            if job is None:
                self.stop.wait(settings.poll_seconds)
                continue
            self.run_job(job)
        log.info("worker_stopped", worker=self.worker_id, jobs_done=self.jobs_done)

    def run_job(self, job: Job) -> JobState:
        """Run one claimed job to its next state; never raises for job failures."""
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(job_id=job.id, job_kind=str(job.kind), worker=self.worker_id)
        self.current_job_id = job.id
        started = time.perf_counter()
        log.info("job_started", attempt=job.attempts, series_id=job.series_id, generation=job.generation)
        try:
            with _Heartbeat(self.runtime, job.id, self.worker_id):
                self._hold()
                self.handler(self.runtime, job)
        except queue.LeaseLostError as exc:
            log.warning("job_lease_lost", error=queue.error_line(exc), seconds=round(time.perf_counter() - started, 3))
            return JobState.RUNNING
        except DestinationDownError as exc:
            return self._deferred(job, exc)
        except Exception as exc:
            return self._failed(job, exc, time.perf_counter() - started)
        finally:
            self.current_job_id = None
            self.jobs_done += 1
        log.info("job_succeeded", seconds=round(time.perf_counter() - started, 3))
        structlog.contextvars.clear_contextvars()
        return JobState.DONE

    def _hold(self) -> None:
        """Testing only (``worker.hold_file``): keep the claimed job running, lease alive, until the file exists.

        Deliberately deaf to ``stop``: it stands for a long job step that a shutdown has to wait for.
        """
        hold = self.runtime.settings.worker.hold_file
        if hold is None:
            return
        log.warning("job_held", hold_file=str(hold))
        while not hold.exists():
            time.sleep(self.runtime.settings.worker.poll_seconds)
        log.info("job_hold_released")

    def _deferred(self, job: Job, exc: DestinationDownError) -> JobState:
        """The destination did not answer: mark it down and give the attempt back, in one transaction.

        Unless it failed its trial (a probe had just found it up and nothing was delivered since): then the
        attempt counts, so a peer that answers probes but never a send ends in ``dead``, not in endless waiting.
        """
        error = queue.error_line(exc)
        try:
            with self.runtime.session_factory.begin() as session:
                failed_trial = destinations.on_trial(session, exc.destination)
                went_down = destinations.mark_down(
                    session, exc.destination, error, first_probe_after=probe_delay(self.runtime.settings, 0)
                )
                state = queue.defer(
                    session,
                    job.id,
                    self.worker_id,
                    destination=exc.destination,
                    error=error,
                    spend_attempt=failed_trial,
                )
                if state == JobState.DEAD:
                    audit.record_export_outcome(
                        session, job.id, outcome="dead", reason="attempts", actor=self.worker_id
                    )
        except queue.LeaseLostError:
            log.warning("job_deferred_after_lease_lost", error=error)
            return JobState.RUNNING
        except Exception as db_error:  # cannot record it now: the lease expires and the reaper retries
            log.error("job_defer_unrecorded", error=error, db_error=queue.error_line(db_error))
            return JobState.RUNNING
        if went_down:
            metrics.DESTINATION_UP.labels(destination=exc.destination).set(0)
            log.warning("destination_down", destination=exc.destination, error=error, failed_trial=failed_trial)
        if state == JobState.DEAD:
            metrics.EXPORTS_DEAD.labels(reason="attempts").inc()
            log.error("export_dead", reason="attempts", attempts=job.attempts, error=error)
        else:
            log.info("job_waiting_for_destination", destination=exc.destination, attempt_spent=failed_trial)
        structlog.contextvars.clear_contextvars()
        return state

    def _audit_given_up(self, job: Job, state: JobState) -> None:
        """Audit an export that will not be retried (its own transaction: ``queue.fail`` already committed)."""
        reason = "attempts" if state == JobState.DEAD else "permanent"
        try:
            with self.runtime.session_factory.begin() as session:
                audit.record_export_outcome(session, job.id, outcome=str(state), reason=reason, actor=self.worker_id)
        except Exception as db_error:  # the job's state is recorded; only its audit row is missing
            log.error("audit_record_failed", kind=audit.EXPORT, db_error=queue.error_line(db_error))

    def _failed(self, job: Job, exc: Exception, seconds: float) -> JobState:
        settings = self.runtime.settings.worker
        try:
            state = queue.fail(
                self.runtime.session_factory,
                job.id,
                self.worker_id,
                exc,
                backoff_base_seconds=settings.backoff_base_seconds,
                backoff_max_seconds=settings.backoff_max_seconds,
            )
        except queue.LeaseLostError:
            log.warning("job_failed_after_lease_lost", error=queue.error_line(exc))
            return JobState.RUNNING
        except Exception as db_error:  # cannot record the failure now: the lease expires and the reaper retries
            log.error("job_fail_unrecorded", error=queue.error_line(exc), db_error=queue.error_line(db_error))
            return JobState.RUNNING
        if job.kind == JobKind.INFER and state in (JobState.FAILED, JobState.DEAD):
            repo.mark_series_failed(self.runtime.session_factory, job, exc)
        if job.kind == JobKind.EXPORT:
            metrics.EXPORT_FAILURES.inc()  # every failed send attempt, retried or not
            if state in (JobState.FAILED, JobState.DEAD):
                self._audit_given_up(job, state)
            if state == JobState.DEAD:
                metrics.EXPORTS_DEAD.labels(reason="attempts").inc()
                log.error("export_dead", reason="attempts", attempts=job.attempts, error=queue.error_line(exc))
        event = "job_retry_scheduled" if state == JobState.QUEUED else "job_failed"
        log.warning(event, new_state=str(state), error=queue.error_line(exc), seconds=round(seconds, 3))
        structlog.contextvars.clear_contextvars()
        return state


def start_worker_threads(
    runtime: Runtime, count: int, stop: threading.Event, *, export_count: int = 0
) -> list[tuple[Worker, threading.Thread]]:
    """``count`` workers, plus ``export_count`` that only export (then the others only infer).

    Separate export slots mean a destination that hangs until its timeouts holds an export thread, never
    the thread an urgent series needs to be assessed.
    """
    kinds: list[tuple[JobKind, ...] | None] = [None] * count
    if export_count > 0:
        infer_only: tuple[JobKind, ...] | None = (JobKind.INFER,)
        export_only: tuple[JobKind, ...] | None = (JobKind.EXPORT,)
        kinds = [infer_only] * count + [export_only] * export_count
    workers = []
    for index, worker_kinds in enumerate(kinds):
        worker = Worker(runtime, worker_id=make_worker_id(index), stop=stop, kinds=worker_kinds)
        name = "export" if worker_kinds == (JobKind.EXPORT,) else "worker"
        thread = threading.Thread(target=worker.run, name=f"{name}-{index}", daemon=True)
        thread.start()
        workers.append((worker, thread))
    return workers


def stop_workers(runtime: Runtime, workers: Sequence[tuple[Worker, threading.Thread]], *, grace_seconds: float) -> None:
    """Wait for current jobs to finish; release the leases of jobs still running after the grace period."""
    deadline = time.monotonic() + grace_seconds
    for worker, thread in workers:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
        if thread.is_alive() and worker.current_job_id is not None:
            released = queue.release(runtime.session_factory, worker.current_job_id, worker.worker_id)
            log.warning("job_released_on_shutdown", job_id=worker.current_job_id, released=released)
