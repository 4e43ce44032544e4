"""Event-driven reactors for pynetdicom 3.0: wait for work instead of polling every millisecond.

pynetdicom runs two loops per association. The DUL loop sleeps ``_run_loop_delay`` (1 ms) whenever it
found nothing to do, and the association loop sleeps 1 ms on every turn. A C-STORE response therefore
waits up to ~2 ms for the two loops to notice it, on an association whose sender waits for each response
before sending the next instance, and every idle association burns CPU at 2 kHz. Measured here with a
bare pynetdicom SCP and ``storescu`` (one association, 1000 × 129 KiB): 337 instances/s polling, 624/s
with the DUL loop not sleeping at all.

Here both loops block until something can happen: the DUL loop in ``select`` on its socket plus a wake-up
pipe written whenever a primitive or event is queued for it; the association loop on an event set whenever
a DIMSE message or a user primitive is queued for it. Both still wake at least every ``MAX_WAIT_S`` to run
the checks pynetdicom makes on each turn (ARTIM and idle timers, peer gone). The loop bodies are
pynetdicom's own, unchanged apart from the wait (``_dul_run_reactor`` and ``_association_run_reactor``
follow pynetdicom 3.0.4 line by line), so the state machine sees exactly the same sequence of events. One
addition: an acceptor whose connection ends before its A-ASSOCIATE-RQ is told at once instead of after
the ACSE timeout (:func:`_connection_ended_before_request`); and an exception from a state machine action
aborts the association as one from the loop body does, instead of killing the DUL thread
(:func:`_abort_after_error`); and a socket is closed even when its shutdown fails (:func:`_shutdown_socket`).

Installed once by :func:`install` (the composition root calls it through ``configure_pynetdicom``); it
refuses other pynetdicom versions, leaving their stock loops in place.
"""

from __future__ import annotations

import contextlib
import os
import queue
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import pynetdicom
import structlog
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import AssociationSocket

log = structlog.get_logger()

#: Longest a loop blocks without being woken; bounds how late timers and peer-gone checks run.
MAX_WAIT_S = 0.1
#: The pynetdicom releases whose loop bodies the replacements below copy.
SUPPORTED_VERSIONS = ("3.0.",)

_install_lock = threading.Lock()
_state = {"installed": False}


class _NotifyingQueue(queue.Queue[Any]):
    """A queue that calls ``notify`` after every put, so its consumer can block instead of polling."""

    def __init__(self, notify: Callable[[], None]) -> None:
        super().__init__()
        self._notify = notify

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._notify()


class _WakePipe:
    """A non-blocking pipe whose read end ``select`` can wait on next to the association's socket."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self.write_fd, False)
        self._pending = False
        self._closed = False
        # Guards close against a concurrent wake: a closed descriptor number may be reused by a file.
        self._lock = threading.Lock()

    def wake(self) -> None:
        if self._pending:
            return
        with self._lock:
            if self._closed:
                return
            self._pending = True
            with contextlib.suppress(OSError):  # pipe full: the reader is already due to wake
                os.write(self.write_fd, b"\0")

    def drain(self) -> None:
        with contextlib.suppress(OSError):
            while os.read(self.read_fd, 512):
                pass
        # Only now: a wake skipped meanwhile (pending still set) queued its item before this, and the
        # caller looks at the queues next.
        self._pending = False

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for fd in (self.read_fd, self.write_fd):
                with contextlib.suppress(OSError):
                    os.close(fd)


# ---------------------------------------------------------------------- DUL loop
_original_dul_init = DULServiceProvider.__init__


def _dul_init(self: DULServiceProvider, assoc: Association) -> None:
    _original_dul_init(self, assoc)
    pipe = _WakePipe()
    self._triaged_wake = pipe  # type: ignore[attr-defined]
    # Everything the DUL loop acts on arrives through these two queues (or the socket).
    self.event_queue = _NotifyingQueue(pipe.wake)
    self.to_provider_queue = _NotifyingQueue(pipe.wake)


def _dul_wait(self: DULServiceProvider, socket_only_wake: bool) -> bool:
    """Block until the socket is readable, the wake pipe is written, or ``MAX_WAIT_S`` passes.

    Returns whether the socket was the only reason to wake (so the caller can fall back to a 1 ms sleep if
    that repeats without anything to do, instead of spinning on a socket the state machine isn't reading).
    """
    pipe: _WakePipe = self._triaged_wake  # type: ignore[attr-defined]
    if socket_only_wake:
        time.sleep(self._run_loop_delay)
        return False
    assoc_socket = self.socket
    sock = assoc_socket.socket if assoc_socket is not None else None
    # Wake in time for the ARTIM timer (remaining is its full timeout while it is not running).
    timeout = max(0.001, min(MAX_WAIT_S, self.artim_timer.remaining))
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return False
    watched = [pipe.read_fd]
    if sock is not None and sock.fileno() >= 0:
        watched.append(sock.fileno())
    try:
        readable, _, _ = select.select(watched, [], [], timeout)
    except (OSError, ValueError):  # socket closed under us: let the loop body notice it
        time.sleep(self._run_loop_delay)
        return False
    if pipe.read_fd in readable:
        pipe.drain()
        return False
    return bool(readable)


def _dul_run_reactor(self: DULServiceProvider) -> None:
    """pynetdicom 3.0.4 ``DULServiceProvider.run_reactor`` with the idle sleep replaced by :func:`_dul_wait`."""
    self._idle_timer.start()
    sleep = False
    socket_only_wake = False
    requested = False
    pipe: _WakePipe = self._triaged_wake  # type: ignore[attr-defined]
    try:
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
                sleep = True
            if sleep:
                socket_only_wake = _dul_wait(self, socket_only_wake)
            if self._kill_thread:
                break
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:
                _abort_after_error(self, exc)
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                sleep = True
                continue
            previous = self.state_machine.current_state
            try:
                self.state_machine.do_action(event)
            except Exception as exc:  # e.g. a DIMSE command set without CommandField (found by fuzzing)
                _abort_after_error(self, exc)
                return
            current = self.state_machine.current_state
            requested = requested or current == "Sta3"  # an A-ASSOCIATE-RQ was received and handed on
            if current == "Sta1" and previous != "Sta1" and not requested:
                _connection_ended_before_request(self)
            sleep = False
            socket_only_wake = False
    finally:
        pipe.close()
        _wake_association(self.assoc)


def _abort_after_error(self: DULServiceProvider, exc: Exception) -> None:
    """pynetdicom's own handling of an exception in the DUL loop: A-ABORT to the peer, end the association.

    Also used for exceptions from the state machine's actions, which pynetdicom lets escape the thread:
    its DIMSE decoder raises on malformed command sets (``AttributeError`` for a missing CommandField),
    which killed the DUL thread with an unhandled exception and left the peer without an A-ABORT.
    """
    pynetdicom.dul.LOGGER.error("Exception in DUL.run(), aborting association")
    pynetdicom.dul.LOGGER.exception(exc)
    abort_pdu = A_ABORT_RQ()
    abort_pdu.source = 0x02
    abort_pdu.reason_diagnostic = 0x00
    if self.socket is not None:
        with contextlib.suppress(OSError):  # the peer may be gone already
            self.socket.send(abort_pdu.encode())
    self.assoc.is_aborted = True
    self.assoc.is_established = False
    self.assoc._kill = True
    self._kill_thread = True


def _connection_ended_before_request(self: DULServiceProvider) -> None:
    """The connection closed before an A-ASSOCIATE-RQ was handed on: silent until ARTIM expired or the peer
    closed (Sta2 -> Sta1), or a malformed request was aborted and the connection then closed (Sta13 -> Sta1).

    pynetdicom's acceptor keeps waiting for the request for its whole ACSE timeout even then, holding
    the connection's thread (and its admission ticket). An empty item is what that wait returns on a
    timeout: handing it over now ends the association at once, exactly as a timeout would.
    """
    if self.assoc.is_acceptor and self.assoc.requestor.primitive is None:
        self.to_user_queue.put(None)  # type: ignore[arg-type]


def _dul_kill(self: DULServiceProvider) -> None:
    self._kill_thread = True
    self._triaged_wake.wake()  # type: ignore[attr-defined]


def _dul_stop(self: DULServiceProvider) -> bool:
    if self.state_machine.current_state == "Sta1":
        self._kill_thread = True
        self._triaged_wake.wake()  # type: ignore[attr-defined]
        while self.is_alive():
            time.sleep(self._run_loop_delay)
        return True
    return False


# ---------------------------------------------------------------------- association loop
_original_association_init = Association.__init__
_original_association_kill = Association.kill


def _association_init(self: Association, ae: Any, mode: str) -> None:
    _original_association_init(self, ae, mode)
    wake = threading.Event()
    self._triaged_wake = wake  # type: ignore[attr-defined]
    # Decoded DIMSE messages and the peer's release/abort reach the association loop through these.
    self.dimse.msg_queue = _NotifyingQueue(wake.set)
    self.dul.to_user_queue = _NotifyingQueue(wake.set)


def _wake_association(assoc: Association) -> None:
    wake = getattr(assoc, "_triaged_wake", None)
    if wake is not None:
        wake.set()


def _association_kill(self: Association) -> None:
    _wake_association(self)
    _original_association_kill(self)


def _association_run_reactor(self: Association) -> None:
    """pynetdicom 3.0.4 ``Association._run_reactor`` with the 1 ms sleep replaced by an event wait.

    Two changes to the pause handshake with the user's ``send_*``/``release`` calls (which clear
    ``_reactor_checkpoint``, spin until ``_is_paused`` and then read the response from the same queue):

    - the loop counts as paused while it waits for work, so such a call never waits for it to wake;
    - after the checkpoint it looks again: a call that paused it between ``wait()`` returning and
      ``_is_paused = False`` has already seen "paused" and will read its response itself. pynetdicom's
      loop has this window too (1 ms polls make it rare); losing that race took the response away from
      the caller ("Received unexpected C-ECHO service message", then a DIMSE timeout) on a loaded machine.
    """
    wake: threading.Event = self._triaged_wake  # type: ignore[attr-defined]
    self._is_paused = False
    busy = False
    while not self._kill:
        self._is_paused = True  # not touching the queues from here until the checks below
        if not busy:  # a message was served last turn: look again before blocking, another may be queued
            wake.wait(MAX_WAIT_S)
            wake.clear()
        self._reactor_checkpoint.wait()
        self._is_paused = False
        if not self._reactor_checkpoint.is_set():
            busy = True  # paused again meanwhile: wait at the checkpoint, not for new work
            continue
        context_id, msg = self.dimse.get_msg(block=False)
        busy = msg is not None
        if msg:
            self._serve_request(msg, context_id)  # type: ignore[arg-type]
        if self.is_established and self.acse.is_release_requested():
            self.acse.send_release(is_response=True)
            pynetdicom.association.LOGGER.info("Association Released")
            self.is_released = True
            self.is_established = False
            evt.trigger(self, evt.EVT_RELEASED, {})
            self.kill()
            return
        if self.acse.is_aborted():
            log_msg = "Association Aborted"
            if self.acse.is_aborted("a-p-abort"):
                log_msg += " (A-P-ABORT)"
            pynetdicom.association.LOGGER.info(log_msg)
            self.dul.receive_pdu(wait=False)
            self.is_aborted = True
            self.is_established = False
            evt.trigger(self, evt.EVT_ABORTED, {})
            self.kill()
            return
        if not self.dul.is_alive():
            self.kill()
            return
        if self.dul.idle_timer_expired():
            pynetdicom.association.LOGGER.error("Network timeout reached")
            if self.network_timeout_response == "A-RELEASE":
                self._is_paused = True
                self._reactor_checkpoint.wait()
                self.release()
                self._is_paused = False
            else:
                self.abort()
            self.kill()
            return


# ---------------------------------------------------------------------- socket close
def _shutdown_socket(self: AssociationSocket) -> None:
    """pynetdicom 3.0.4 ``AssociationSocket._shutdown_socket``, closing the socket even if shutdown fails.

    pynetdicom skips ``close()`` when ``shutdown()`` raises, which it does whenever the peer has already
    reset the connection: the descriptor then stays open until the socket object is garbage-collected
    (a ``ResourceWarning``). Found by the fuzz harness.
    """
    sock = self.socket
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


def is_supported(version: str) -> bool:
    """Whether ``version`` is a pynetdicom release whose loop bodies the replacements copy."""
    return version.startswith(SUPPORTED_VERSIONS)


def is_installed() -> bool:
    return bool(_state["installed"])


def install() -> bool:
    """Replace pynetdicom's polling loops process-wide (idempotent); return whether they are in place."""
    with _install_lock:
        if _state["installed"]:
            return True
        version = pynetdicom.__version__
        if not is_supported(version):
            log.warning("pynetdicom_reactor_not_replaced", version=version, supported=list(SUPPORTED_VERSIONS))
            return False
        DULServiceProvider.__init__ = _dul_init  # type: ignore[method-assign]
        DULServiceProvider.run_reactor = _dul_run_reactor  # type: ignore[method-assign]
        DULServiceProvider.kill_dul = _dul_kill  # type: ignore[method-assign]
        DULServiceProvider.stop_dul = _dul_stop  # type: ignore[method-assign]
        Association.__init__ = _association_init  # type: ignore[method-assign]
        Association.kill = _association_kill  # type: ignore[method-assign]
        Association._run_reactor = _association_run_reactor  # type: ignore[method-assign]
        AssociationSocket._shutdown_socket = _shutdown_socket  # type: ignore[method-assign]
        _state["installed"] = True
        return True
