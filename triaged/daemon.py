"""`triaged serve` / `triaged worker`: wire receiver, workers, housekeeping and the web console in one process.

The model is loaded once per process and shared by the worker threads. Housekeeping runs on an
APScheduler ``BackgroundScheduler``: the series sweep (complete series → infer jobs), the reaper (jobs
whose lease ran out, associations of receivers whose heartbeat ran out), the retention purge and the jobs
gauges; a process that receives also beats its receivers' heartbeat on it. SIGTERM/SIGINT stop accepting
associations, let current jobs finish (releasing their leases if they overrun the grace period) and return
exit status 0.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from datetime import timedelta
from types import FrameType
from typing import Any, Protocol

import structlog
from sqlalchemy import text

from triaged import metrics
from triaged.config import Settings
from triaged.db import queue, receivers, repo
from triaged.db.engine import make_engine
from triaged.db.models import utcnow
from triaged.db.schema import require_current_schema
from triaged.outputs.destinations import expire_old_exports, probe_due_destinations, refresh_destination_gauges
from triaged.outputs.headers import quiet_person_name_warnings
from triaged.runtime import Runtime, build_runtime
from triaged.web.app import create_app
from triaged.web.context import WebContext
from triaged.web.passwords import LoginLimiter
from triaged.web.server import WebServer
from triaged.worker import Worker, start_worker_threads, stop_workers

log = structlog.get_logger()

REAPER_INTERVAL_SECONDS = 5.0
GAUGE_INTERVAL_SECONDS = 5.0
DESTINATION_INTERVAL_SECONDS = 0.5  # only looks for due probes; the probes themselves back off
PURGE_INTERVAL_SECONDS = 3600.0  # at most; about four purges per retention period
SHUTDOWN_GRACE_SECONDS = 30.0  # then still-running jobs are released and run again elsewhere


class ReceiverLike(Protocol):
    @property
    def port(self) -> int: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def heartbeat(self) -> None: ...


def check_schema(settings: Settings) -> None:
    """Raise :class:`~triaged.errors.SchemaOutdatedError` (one line naming `triaged db upgrade`)."""
    engine = make_engine(settings.database_url, busy_timeout_ms=settings.database.busy_timeout_ms)
    try:
        require_current_schema(engine)
    finally:
        engine.dispose()


def refresh_job_gauges(runtime: Runtime) -> None:
    counts = queue.counts_by_state(runtime.session_factory)
    metrics.JOBS_BY_STATE.clear()
    for (kind, state), n in counts.items():
        metrics.JOBS_BY_STATE.labels(kind=kind, state=state).set(n)
    metrics.QUEUE_DEPTH.set(sum(n for (_, state), n in counts.items() if state == "queued"))


def destinations_housekeeping(runtime: Runtime) -> None:
    """Probe down destinations that are due, expire exports older than ``outputs.max_age_hours``, gauges."""
    probe_due_destinations(runtime.session_factory, runtime.settings)
    expire_old_exports(runtime.session_factory, runtime.settings)
    refresh_destination_gauges(runtime.session_factory)


def reaper_interval(settings: Settings) -> float:
    """Often enough for both time-outs the reaper enforces (the job lease and the receiver heartbeat)."""
    return min(REAPER_INTERVAL_SECONDS, settings.worker.lease_seconds / 2, settings.dicom.receiver_timeout_seconds / 2)


def reap(runtime: Runtime) -> None:
    """The reaper: re-queue jobs whose worker's lease ran out, close the associations of receivers whose
    heartbeat ran out (their series then complete). One failing does not keep the other from running."""
    settings = runtime.settings
    _guarded("lease_reaper", lambda: queue.reap_expired_leases(runtime.session_factory))()
    _guarded(
        "receiver_reaper",
        lambda: receivers.reap_dead_receivers(runtime.session_factory, settings.dicom.receiver_timeout_seconds),
    )()


def _guarded(name: str, func: Callable[[], Any]) -> Callable[[], None]:
    """A housekeeping task that logs its failure and runs again next time (never kills the scheduler)."""

    def run() -> None:
        try:
            func()
        except Exception as exc:
            log.warning("housekeeping_failed", task=name, error=queue.error_line(exc))

    return run


class Daemon:
    """One process: optional receiver, N worker threads, housekeeping, probes."""

    def __init__(self, settings: Settings, *, receive: bool = True, housekeeping: bool = True) -> None:
        self.settings = settings
        self.receive = receive
        self.housekeeping = housekeeping
        self.stop_event = threading.Event()
        self.runtime: Runtime | None = None
        self.receiver: ReceiverLike | None = None
        self.http: WebServer | None = None
        self._scheduler: Any = None
        self._workers: list[tuple[Worker, threading.Thread]] = []

    # -- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> None:
        settings = self.settings
        check_schema(settings)
        quiet_person_name_warnings()
        workers = settings.worker.count
        self.runtime = runtime = build_runtime(settings, load_model=workers > 0)
        if self.receive:
            receiver: ReceiverLike
            if settings.dicom.receiver_processes > 1:
                from triaged.receive.pool import ReceiverPool

                receiver = ReceiverPool(settings, runtime.session_factory)
            else:
                from triaged.receive.scp import Receiver

                receiver = Receiver(settings, runtime.session_factory, runtime.store)
            receiver.start()
            self.receiver = receiver
        if settings.http.enabled:
            context = WebContext(
                settings=settings,
                session_factory=runtime.session_factory,
                store=runtime.store,
                readiness=self.readiness,
                limiter=LoginLimiter(settings.http.login_attempts, settings.http.login_window_seconds),
            )
            self.http = WebServer(create_app(context), settings.http)
            self.http.start()
        if self.housekeeping or self.receiver is not None:
            self._start_scheduler(runtime)
        export_workers = settings.worker.export_count if workers > 0 else 0
        self._workers = start_worker_threads(runtime, workers, self.stop_event, export_count=export_workers)
        triage = runtime.triage
        log.info(
            "daemon_started",
            dicom_port=self.receiver.port if self.receiver else None,
            http_port=self.http.port if self.http else None,
            workers=workers,
            export_workers=export_workers,
            model=triage.model_name if triage else None,
            model_version=triage.model_version if triage else None,
            # the resolved placement when the model API exposes it (model_loaded logs it too), else the setting
            device=str(getattr(triage, "device", settings.model.device)),
            precision=str(getattr(triage, "precision", settings.model.precision)),
            torch_threads=settings.worker.torch_threads,
            database=runtime.engine.dialect.name if runtime.engine else None,
        )

    def stop(self, grace_seconds: float | None = None) -> None:
        """Stop accepting, let jobs finish (release overrunning leases), stop housekeeping and probes."""
        log.info("daemon_stopping")
        if self.receiver is not None:
            self.receiver.stop()
        self.stop_event.set()
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=True)
            self._scheduler = None
        if self.runtime is not None:
            grace = (
                min(self.settings.worker.lease_seconds, SHUTDOWN_GRACE_SECONDS)
                if grace_seconds is None
                else grace_seconds
            )
            stop_workers(self.runtime, self._workers, grace_seconds=grace)
        if self.http is not None:
            self.http.stop()
        if self.runtime is not None and self.runtime.engine is not None:
            self.runtime.engine.dispose()
        log.info("daemon_stopped")

    def run_until_signal(self, on_started: Callable[[Daemon], None] | None = None) -> int:
        """Install SIGTERM/SIGINT handlers, start, block until a signal, stop; return the exit status."""

        def _handle(signum: int, frame: FrameType | None) -> None:
            log.info("signal_received", signal=signal.Signals(signum).name)
            self.stop_event.set()

        previous = {sig: signal.signal(sig, _handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            if on_started is not None:
                on_started(self)
            while not self.stop_event.wait(1.0):
                pass
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return 0

    # -- housekeeping ------------------------------------------------------------------------------------
    def _start_scheduler(self, runtime: Runtime) -> None:
        from apscheduler.schedulers.background import BackgroundScheduler

        settings = self.settings
        scheduler = BackgroundScheduler(timezone="UTC", job_defaults={"coalesce": True, "max_instances": 1})
        receiver = self.receiver
        if receiver is not None:  # even without housekeeping: a receiver that does not beat gets reaped
            scheduler.add_job(
                _guarded("receiver_heartbeat", receiver.heartbeat),
                "interval",
                seconds=settings.dicom.heartbeat_seconds,
                id="receiver_heartbeat",
            )
        if self.housekeeping:
            self._add_housekeeping(scheduler, runtime)
        scheduler.start()
        self._scheduler = scheduler

    def _add_housekeeping(self, scheduler: Any, runtime: Runtime) -> None:
        settings = self.settings
        if self.receive:
            from triaged.receive.series import sweep_complete_series

            scheduler.add_job(
                _guarded("series_sweep", lambda: sweep_complete_series(runtime.session_factory, settings)),
                "interval",
                seconds=settings.series.sweep_interval_seconds,
                id="series_sweep",
            )
        scheduler.add_job(lambda: reap(runtime), "interval", seconds=reaper_interval(settings), id="reaper")
        scheduler.add_job(
            _guarded("job_gauges", lambda: refresh_job_gauges(runtime)),
            "interval",
            seconds=GAUGE_INTERVAL_SECONDS,
            id="job_gauges",
        )
        # Its own task (APScheduler runs tasks on a thread pool): a probe waiting on a hung PACS until its
        # timeouts never delays the series sweep or the reaper.
        scheduler.add_job(
            _guarded("destinations", lambda: destinations_housekeeping(runtime)),
            "interval",
            seconds=DESTINATION_INTERVAL_SECONDS,
            id="destinations",
        )
        retention = settings.storage.retention_days
        if retention is not None:
            scheduler.add_job(
                _guarded(
                    "retention_purge",
                    lambda: repo.purge_received_files(
                        runtime.session_factory, runtime.store, utcnow() - timedelta(days=retention)
                    ),
                ),
                "interval",
                seconds=min(PURGE_INTERVAL_SECONDS, max(1.0, retention * 86400 / 4)),
                id="retention_purge",
                next_run_time=utcnow(),
            )

    # -- probes ------------------------------------------------------------------------------------------
    def readiness(self) -> dict[str, str]:
        checks: dict[str, str] = {}
        runtime = self.runtime
        if runtime is None or runtime.engine is None:
            return {"started": "not started"}
        try:
            with runtime.engine.connect() as connection:
                connection.execute(text("SELECT 1"))
            checks["database"] = "ok"
        except Exception as exc:
            checks["database"] = queue.error_line(exc)
        if checks["database"] == "ok":
            try:
                require_current_schema(runtime.engine)
                checks["schema"] = "ok"
            except Exception as exc:
                checks["schema"] = queue.error_line(exc)
        if self.settings.worker.count > 0:
            checks["model"] = "ok" if runtime.triage is not None else "model not loaded"
        if self.receive:
            checks["receiver"] = self._receiver_state()
        if self.stop_event.is_set():
            checks["shutdown"] = "stopping"
        return checks

    def _receiver_state(self) -> str:
        try:
            listening = self.receiver is not None and bool(self.receiver.port)
        except RuntimeError:  # stopped (shutting down): a stopped receiver has no port
            listening = False
        return "ok" if listening else "not listening"
