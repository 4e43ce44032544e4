"""Several receiver processes on one DICOM port, so concurrent associations are not capped by one GIL.

A :class:`~triaged.receive.scp.Receiver` runs its associations as threads of one process, which gives them
about one core between them. With ``dicom.receiver_processes`` = N > 1 the daemon runs a
:class:`ReceiverPool` instead: N "spawn" children (no inherited threads or database connections), each
with its own engine, session factory, store and ``Receiver``, all listening on the same address and port
with ``SO_REUSEPORT`` (Linux), so the kernel spreads new connections over them. Each child has its own
``receiver_id`` (``<base>:<index>``): the associations table and the stale-association clean-up at start
stay per process. The limits (``dicom.max_associations``, ``dicom.max_connections_per_address``) hold in
total: the children count what they hold in one shared :class:`~triaged.receive.slots.SlotTable`, so a
limit of 16 means 16 associations wherever the kernel puts them, not 16 per process or ``ceil(16 / N)``
each. The parent supervises: a child that dies is logged, its row of the table zeroed (its connections died
with it), and it is started again after a short back-off; :meth:`ReceiverPool.stop` sends SIGTERM, and each
child drains like ``Receiver.stop``. Children forward their instance counters to the parent, whose
``/metrics`` serves them.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy.orm import Session, sessionmaker

from triaged import metrics
from triaged.config import Settings
from triaged.db import receivers
from triaged.db.engine import make_engine, make_session_factory
from triaged.errors import TriagedError
from triaged.log import configure_logging
from triaged.receive.associations import close_stale_associations, default_receiver_id
from triaged.receive.scp import Receiver
from triaged.receive.slots import ASSOCIATION_BUCKET, SlotTable, new_counts
from triaged.receive.storage import InstanceStore

log = structlog.get_logger()


START_TIMEOUT_SECONDS = 60.0  # spawn, imports and the first database round trip on a busy machine
KILL_GRACE_SECONDS = 10.0  # after the drain timeout, before SIGKILL
RESTART_BACKOFF_SECONDS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
STABLE_SECONDS = 60.0  # a child that ran this long starts its back-off from the beginning again
PARENT_CHECK_SECONDS = 0.5  # how often a child looks for SIGTERM or a vanished parent


class ReceiverStartError(TriagedError):
    """A receiver process could not start listening."""


@dataclass(frozen=True)
class _ChildSpec:
    """What a child needs, as picklable plain data (it rebuilds everything else itself)."""

    settings_data: dict[str, Any]
    receiver_id: str
    port: int
    index: int
    processes: int
    slots_lock_path: str
    stop_timeout: float


@dataclass
class _Child:
    index: int
    receiver_id: str
    process: BaseProcess
    conn: Connection  # the child reports its start here; it sees EOF when the parent is gone
    started_at: float
    backoff_step: int = 0  # restarts since it last ran for STABLE_SECONDS


class ReceiverPool:
    """N receiver processes sharing one port; :meth:`start` returns once all listen, :meth:`stop` drains.

    ``session_factory`` (optional) is used at start, to close associations that an earlier run under the
    same base id left open, whatever its process count was (each child only closes its own id's), and by
    :meth:`heartbeat`, which beats for every child: without it the children's heartbeats run out, and a
    reaper elsewhere would close their associations.
    """

    def __init__(
        self,
        settings: Settings,
        session_factory: sessionmaker[Session] | None = None,
        *,
        processes: int | None = None,
        receiver_id: str | None = None,
        port: int | None = None,
        stop_timeout: float = 30.0,
    ) -> None:
        dicom = settings.dicom
        self.processes = dicom.receiver_processes if processes is None else processes
        if self.processes < 1:
            raise ValueError(f"processes must be >= 1, got {self.processes}")
        self.settings = settings
        self.session_factory = session_factory
        self._bind_port = dicom.port if port is None else port
        self.receiver_id = receiver_id or default_receiver_id(dicom.ae_title, self._bind_port)
        self.stop_timeout = stop_timeout
        self._settings_data = settings.model_dump(mode="json")  # plain data: Settings subclasses may not pickle
        self._ctx = multiprocessing.get_context("spawn")
        # The limits hold in total: every child counts in this table (shared memory, one row per child).
        self._counts = new_counts(self.processes, self._ctx)
        self._slots: SlotTable | None = None  # the parent's view, for totals and zeroing a dead child's row
        self._slots_lock_path: Path | None = None
        self._children: list[_Child] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._wake: tuple[socket.socket, socket.socket] | None = None  # lets stop() interrupt the supervisor
        self._supervisor: threading.Thread | None = None
        self._port: int | None = None
        self.restarts = 0  # children started again after dying (a successful start counts)

    # ------------------------------------------------------------------ lifecycle
    @property
    def port(self) -> int:
        """The port every child listens on (settings port 0 picks a free one)."""
        if self._port is None:
            raise RuntimeError("receiver pool is not started")
        return self._port

    @property
    def pids(self) -> list[int]:
        """Process ids of the current children (for tests and operators)."""
        with self._lock:
            return [c.process.pid for c in self._children if c.process.pid is not None]

    def start(self) -> None:
        """Start every child and wait until each listens; raise (and stop the others) if one cannot."""
        if self._children:
            raise RuntimeError("receiver pool already started")
        dicom = self.settings.dicom
        if self._bind_port:
            _check_port_free(dicom.bind_address, self._bind_port)  # SO_REUSEPORT would share it silently
        self._close_stale_associations()
        fd, lock_path = tempfile.mkstemp(prefix="triaged-receiver-slots-", suffix=".lock")
        os.close(fd)
        self._slots_lock_path = Path(lock_path)
        self._slots = SlotTable(self._counts, self.processes, 0, self._slots_lock_path)
        try:
            first = self._spawn(0, self._bind_port)
            self._port = self._await_started(first)
            others = [self._spawn(index, self._port) for index in range(1, self.processes)]
            for child in others:
                self._await_started(child)
        except BaseException:
            self._terminate(list(self._children), timeout=5.0)
            for child in self._children:
                child.conn.close()
            self._children.clear()
            self._port = None
            self._close_slots()
            raise
        self._wake = socket.socketpair()
        self._supervisor = threading.Thread(target=self._supervise, name="triaged-receiver-pool", daemon=True)
        self._supervisor.start()
        log.info(
            "receiver_pool_started",
            processes=self.processes,
            port=self._port,
            max_associations=self.settings.dicom.max_associations,
            receiver_id=self.receiver_id,
        )

    def stop(self) -> None:
        """SIGTERM every child (each drains for up to ``stop_timeout`` s), then SIGKILL what is left."""
        if self._stopping.is_set():
            return
        with self._lock:
            self._stopping.set()
            children = list(self._children)
        if self._wake is not None:
            self._wake[1].send(b"x")
        # A child the supervisor is restarting right now is in the list too, and gets the SIGTERM.
        killed = self._terminate(children, timeout=self.stop_timeout + KILL_GRACE_SECONDS)
        if self._supervisor is not None:
            self._supervisor.join(timeout=START_TIMEOUT_SECONDS)
        for child in children:
            _apply_counts(child.conn)  # what each child counted while draining
            child.conn.close()
        if self._wake is not None:
            for end in self._wake:
                end.close()
        self._close_slots()
        log.info("receiver_pool_stopped", processes=len(children), killed=killed)

    @property
    def receiver_ids(self) -> list[str]:
        """The ids the children record their associations under (``<base>:<index>``)."""
        with self._lock:
            return [c.receiver_id for c in self._children]

    def heartbeat(self) -> None:
        """Beat for every child while this parent supervises it (a dead child is restarted, which closes what
        it left open); when the parent dies, its children stop and the beats stop with them."""
        if self.session_factory is None:
            return
        with self._lock:
            pids = {c.receiver_id: c.process.pid for c in self._children}
        receivers.beat(self.session_factory, pids)

    def associations_in_use(self) -> int:
        """Associations held right now over all children (from the shared table)."""
        if self._slots is None:
            raise RuntimeError("receiver pool is not started")
        return self._slots.total(ASSOCIATION_BUCKET)

    def _close_slots(self) -> None:
        if self._slots is not None:
            self._slots.close()
        if self._slots_lock_path is not None:
            with contextlib.suppress(OSError):
                self._slots_lock_path.unlink()

    # ------------------------------------------------------------------ children
    def _spawn(self, index: int, port: int, backoff_step: int = 0) -> _Child:
        parent_conn, child_conn = self._ctx.Pipe()
        receiver_id = f"{self.receiver_id}:{index}"
        assert self._slots_lock_path is not None
        spec = _ChildSpec(
            self._settings_data,
            receiver_id,
            port,
            index,
            self.processes,
            str(self._slots_lock_path),
            self.stop_timeout,
        )
        process = self._ctx.Process(
            target=_child_main,
            args=(spec, child_conn, self._counts),
            name=f"triaged-receiver-{index}",
            daemon=True,  # multiprocessing terminates daemonic children if the parent exits without stop()
        )
        with self._lock:  # stop() lists the children under this lock: each one it misses never starts
            if self._stopping.is_set():
                parent_conn.close()
                child_conn.close()
                raise ReceiverStartError("receiver pool is stopping")
            process.start()
            child_conn.close()
            child = _Child(index, receiver_id, process, parent_conn, time.monotonic(), backoff_step)
            if index < len(self._children):
                self._children[index] = child
            else:
                self._children.append(child)
        return child

    def _await_started(self, child: _Child) -> int:
        """The port the child listens on, once it says so; raise if it fails, exits or takes too long."""
        name = f"receiver process {child.index}"
        if not child.conn.poll(START_TIMEOUT_SECONDS):
            raise ReceiverStartError(f"{name} did not start listening within {START_TIMEOUT_SECONDS:.0f} s")
        try:
            message = child.conn.recv()
        except EOFError:
            child.process.join(5.0)
            raise ReceiverStartError(f"{name} exited with code {child.process.exitcode} before listening") from None
        if message[0] == "failed":
            _, errno, text = message
            if errno is not None:
                raise OSError(errno, f"{name}: {text}")
            raise ReceiverStartError(f"{name} failed to start: {text}")
        port = int(message[1])
        if self._port is not None and port != self._port:
            raise ReceiverStartError(f"{name} listens on port {port}, not {self._port}")
        return port

    def _supervise(self) -> None:
        """Restart children that die while the pool runs, with a back-off for ones that keep dying."""
        while not self._stopping.is_set():
            with self._lock:
                children = list(self._children)
            assert self._wake is not None
            conns = [c.conn for c in children if not c.conn.closed]
            ready = wait([c.process.sentinel for c in children] + conns + [self._wake[0]])
            for child in children:
                if child.conn in ready:
                    _apply_counts(child.conn)
            for child in children:
                if self._stopping.is_set():
                    return
                if child.process.exitcode is None:
                    continue
                self._restart(child)

    def _restart(self, dead: _Child) -> None:
        ran = time.monotonic() - dead.started_at
        step = 0 if ran >= STABLE_SECONDS else dead.backoff_step
        delay = RESTART_BACKOFF_SECONDS[min(step, len(RESTART_BACKOFF_SECONDS) - 1)]
        log.error(
            "receiver_process_died",
            index=dead.index,
            receiver_id=dead.receiver_id,
            exitcode=dead.process.exitcode,
            ran_seconds=round(ran, 1),
            restart_in_seconds=delay,
        )
        if self._stopping.wait(delay):
            return
        _apply_counts(dead.conn)
        dead.conn.close()
        if self._slots is not None:  # what it held died with it
            self._slots.reset_row(dead.index)
        try:
            child = self._spawn(dead.index, self.port, step + 1)
        except ReceiverStartError:  # stop() has begun
            return
        except OSError as exc:  # e.g. out of processes: try again after a longer back-off
            log.error("receiver_process_restart_failed", index=dead.index, error=f"{type(exc).__name__}: {exc}")
            dead.backoff_step, dead.started_at = step + 1, time.monotonic()
            return
        try:
            self._await_started(child)
        except (ReceiverStartError, OSError) as exc:
            # It exits (or is killed here); the supervisor sees that and tries again after a longer back-off.
            log.error("receiver_process_restart_failed", index=child.index, error=f"{type(exc).__name__}: {exc}")
            if child.process.exitcode is None:
                child.process.kill()
            return
        self.restarts += 1
        log.info("receiver_process_restarted", index=child.index, receiver_id=child.receiver_id, pid=child.process.pid)

    def _terminate(self, children: list[_Child], timeout: float) -> int:
        """SIGTERM, wait up to ``timeout`` s in all, SIGKILL the rest; return how many were killed."""
        for child in children:
            if child.process.exitcode is None and child.process.pid is not None:
                child.process.terminate()
        deadline = time.monotonic() + timeout
        for child in children:
            child.process.join(max(0.0, deadline - time.monotonic()))
        killed = 0
        for child in children:
            if child.process.exitcode is None:
                log.warning("receiver_process_killed", index=child.index, receiver_id=child.receiver_id)
                child.process.kill()
                child.process.join(5.0)
                killed += 1
        return killed

    # ------------------------------------------------------------------ associations table
    def _close_stale_associations(self) -> None:
        """Close rows left open by an earlier run under this base id, e.g. one with more processes."""
        if self.session_factory is not None:
            close_stale_associations(self.session_factory, self.receiver_id)


def _counts() -> dict[str, float]:
    """This process's instance counters: ``""`` for received, else the rejection reason."""
    values = {
        "": sum(s.value for m in metrics.INSTANCES_RECEIVED.collect() for s in m.samples if s.name.endswith("_total"))
    }
    for family in metrics.INSTANCES_REJECTED.collect():
        values.update({s.labels["reason"]: s.value for s in family.samples if s.name.endswith("_total")})
    return values


def _send_counts(conn: Connection, sent: dict[str, float]) -> None:
    """Send what the counters gained since ``sent`` (updated in place); nothing when they did not move."""
    now = _counts()
    deltas = {key: value - sent.get(key, 0.0) for key, value in now.items() if value != sent.get(key, 0.0)}
    if deltas:
        conn.send(("counts", deltas))
        sent.update(now)


def _apply_counts(conn: Connection) -> None:
    """Add the counter deltas waiting on ``conn`` to this (the parent's) registry."""
    try:
        while not conn.closed and conn.poll(0):
            message = conn.recv()
            if message[0] != "counts":
                continue
            for key, delta in message[1].items():
                if key:
                    metrics.INSTANCES_REJECTED.labels(reason=key).inc(delta)
                else:
                    metrics.INSTANCES_RECEIVED.inc(delta)
    except (EOFError, OSError):  # the child is gone; the supervisor deals with that
        return


def _check_port_free(address: str, port: int) -> None:
    """Raise ``OSError`` (address in use) if anything listens on the port, even with ``SO_REUSEPORT``."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers are fine
        probe.bind((address, port))


def _child_main(spec: _ChildSpec, conn: Connection, counts: Any) -> None:
    """A receiver process: listen, report the port, serve until SIGTERM or the parent is gone, drain."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent decides
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # a parent waiting in sigwait() blocks it
    settings = Settings.model_validate(spec.settings_data)
    configure_logging(settings.log_level, settings.log_format)
    engine = make_engine(settings.database_url, busy_timeout_ms=settings.database.busy_timeout_ms)
    try:
        store = InstanceStore(settings.storage_dir, settings.storage.min_free_bytes)
        slots = SlotTable(counts, spec.processes, spec.index, Path(spec.slots_lock_path))
        receiver = Receiver(
            settings,
            make_session_factory(engine),
            store,
            receiver_id=spec.receiver_id,
            port=spec.port,
            reuse_port=True,
            slots=slots,
        )
        receiver.start()
    except Exception as exc:  # reported to the parent, whose start() raises it
        errno = exc.errno if isinstance(exc, OSError) else None
        text = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {exc}"
        conn.send(("failed", errno, " ".join(str(text).split())[:500]))
        engine.dispose()
        raise SystemExit(1) from None
    conn.send(("started", receiver.port))
    sent: dict[str, float] = {}
    while not stop.is_set():
        if conn.poll(PARENT_CHECK_SECONDS):  # the parent never writes: readable means it is gone
            log.warning("receiver_parent_gone", receiver_id=spec.receiver_id)
            break
        _send_counts(conn, sent)
    receiver.stop(timeout=spec.stop_timeout)
    engine.dispose()
    with contextlib.suppress(OSError):  # the parent may be gone
        _send_counts(conn, sent)
