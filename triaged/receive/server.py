"""The accept side of the receiver: pynetdicom's association server with admission and a bounded handshake.

pynetdicom's ``ThreadedAssociationServer`` starts an association for every TCP connection and counts all
of them, associated or not, against ``AE.maximum_associations``; it handshakes TLS inside ``accept`` (one
slow client stalls the listener for everyone) and keeps an association thread for a silent connection for
the whole ACSE timeout. Here, through pynetdicom's own extension points (``make_server``'s server class
and its ``request_handler``):

- the accept thread only accepts (and wraps TLS without handshaking);
- each connection's own short-lived thread takes a per-address ticket from :class:`Admission` (closing
  the connection at once when its address has too many), completes the TLS handshake within
  ``artim_timeout`` and only then starts the pynetdicom association;
- the association thread gives its ticket back when it ends, however it ends.

Association slots are taken later, by the receiver's ``EVT_REQUESTED`` handler, once the A-ASSOCIATE-RQ
has arrived (:mod:`triaged.receive.scp`); a connection silent for ``artim_timeout`` is closed by
pynetdicom's ARTIM timer (PS3.8 section 9.1.5), which :class:`ReceiverAE` sets from the same setting.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

import structlog
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from triaged.receive.admission import Admission, Ticket

log = structlog.get_logger()

_TICKET_ATTRIBUTE = "_triaged_ticket"


def ticket_of(assoc: Association) -> Ticket | None:
    """The admission ticket of an acceptor association (``None`` for associations we did not admit)."""
    ticket = getattr(assoc, _TICKET_ATTRIBUTE, None)
    return ticket if isinstance(ticket, Ticket) else None


class ReceiverAE(AE):
    """An AE whose ``start_server`` builds :class:`GuardedServer` with :class:`GuardedRequestHandler`.

    pynetdicom's ``start_server`` hard-codes its server class; ``make_server`` is where it can be swapped.
    The request handler reaches ``admission`` and the timers through ``server.ae``.
    """

    def __init__(self, ae_title: str, admission: Admission, *, artim_timeout: float, reuse_port: bool) -> None:
        super().__init__(ae_title=ae_title)
        self.admission = admission
        self.artim_timeout = artim_timeout
        self.reuse_port = reuse_port  # SO_REUSEPORT: share the port with sibling processes (ReceiverPool)
        # Acceptor side: the ACSE timeout is how long a connection may take to send its A-ASSOCIATE-RQ
        # (and wait for the peer to close after a reject or release): PS3.8's ARTIM.
        self.acse_timeout = artim_timeout
        # pynetdicom's own limit counts connections that never associated; Admission decides instead.
        self.maximum_associations = 2**31 - 1

    def make_server(self, address: Any, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("server_class") is ThreadedAssociationServer:
            kwargs["server_class"] = GuardedServer
            kwargs["request_handler"] = GuardedRequestHandler
        return super().make_server(address, *args, **kwargs)


class GuardedServer(ThreadedAssociationServer):
    """Accept only; everything per connection happens on that connection's own thread."""

    # Connection threads only handshake and start the association (whose thread pynetdicom tracks):
    # nothing to join at close, and a stalled handshake must not hold up stop().
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128  # listen backlog: a burst of connections is queued, not refused by the kernel

    def server_bind(self) -> None:
        assert self.socket is not None
        if isinstance(self.ae, ReceiverAE) and self.ae.reuse_port:
            # pynetdicom's server_bind sets only SO_REUSEADDR and ignores socketserver's allow_reuse_port.
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept and, with TLS, wrap without handshaking: the handshake runs on the connection's thread."""
        assert self.socket is not None
        client_socket, address = self.socket.accept()
        if self.ssl_context is None:
            return client_socket, address
        try:
            wrapped = self.ssl_context.wrap_socket(client_socket, server_side=True, do_handshake_on_connect=False)
        except (OSError, ValueError):
            client_socket.close()
            raise
        return wrapped, address


class GuardedRequestHandler(RequestHandler):
    """Admit a connection, handshake TLS within ARTIM, then run pynetdicom's association for it."""

    def handle(self) -> None:
        ae = self.ae
        if not isinstance(ae, ReceiverAE):  # pragma: no cover - ReceiverAE is what installs this handler
            raise TypeError("GuardedRequestHandler needs a ReceiverAE")
        sock = self.request
        assert isinstance(sock, socket.socket)
        address = str(self.client_address[0])
        peer = f"{address}:{self.client_address[1]}"
        ticket = ae.admission.open_connection(address)
        if ticket is None:
            log.warning(
                "connection_refused",
                peer=peer,
                reason="too_many_connections_from_address",
                limit=ae.admission.max_connections_per_address,
            )
            self.server.shutdown_request(sock)
            return
        try:
            if isinstance(sock, ssl.SSLSocket) and not _handshake(sock, ae.artim_timeout, peer):
                ae.admission.close_connection(ticket)
                self.server.shutdown_request(sock)
                return
            assoc = self._create_association()
            setattr(assoc, _TICKET_ATTRIBUTE, ticket)
            _release_when_done(assoc, ticket, ae.admission, peer)
            evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
            assoc.start()
        except Exception:  # e.g. no thread could be started: give the ticket back, close the connection
            log.exception("connection_setup_failed", peer=peer)
            ae.admission.close_connection(ticket)
            self.server.shutdown_request(sock)


def _handshake(sock: ssl.SSLSocket, timeout: float, peer: str) -> bool:
    """Complete the server side of the TLS handshake within ``timeout`` s; log why when it fails.

    CPython applies a socket timeout to the handshake as one deadline for the whole call, not per read, so
    a client trickling its ClientHello cannot stretch it (tested).
    """
    try:
        sock.settimeout(timeout)
        sock.do_handshake()
        sock.settimeout(None)  # pynetdicom reads only once select() says the socket is readable
    except ssl.SSLError as exc:
        log.warning("tls_handshake_failed", peer=peer, reason=exc.reason or type(exc).__name__, error=str(exc)[:200])
        return False
    except (TimeoutError, OSError) as exc:
        reason = "timeout" if isinstance(exc, TimeoutError) else type(exc).__name__
        log.warning("tls_handshake_failed", peer=peer, reason=reason, error=str(exc)[:200])
        return False
    return True


def _release_when_done(assoc: Association, ticket: Ticket, admission: Admission, peer: str) -> None:
    """Wrap the association thread's ``run`` so the ticket is given back when the thread ends."""
    run: Callable[[], None] = assoc.run
    opened = time.monotonic()

    def run_then_release() -> None:
        try:
            run()
        finally:
            admission.close_connection(ticket)
            if assoc.requestor.primitive is None:  # the connection ended without an A-ASSOCIATE-RQ
                log.info(
                    "connection_closed_before_association",
                    peer=peer,
                    seconds=round(time.monotonic() - opened, 3),
                )
            with contextlib.suppress(OSError):  # pynetdicom closes it on most paths, not all
                sock = assoc.dul.socket.socket if assoc.dul.socket is not None else None
                if sock is not None:
                    sock.close()

    assoc.run = run_then_release  # type: ignore[method-assign]
