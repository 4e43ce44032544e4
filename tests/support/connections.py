"""Raw TCP peers for the receiver's connection limits: idle connections from chosen loopback addresses.

Linux routes all of 127.0.0.0/8 to the loopback interface, so binding a client socket to 127.0.0.N gives
the receiver a distinct peer address per N without any network set-up.
"""

from __future__ import annotations

import contextlib
import functools
import socket
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage
from pynetdicom import AE
from pynetdicom.association import Association

VERIFICATION = "1.2.840.10008.1.1"


def connect_from(source: str, port: int, *, host: str = "127.0.0.1") -> socket.socket:
    """A TCP connection to ``host:port`` whose local address is ``source``; it sends nothing."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))
    sock.connect((host, port))
    return sock


@contextmanager
def idle_connections(port: int, sources: Sequence[str], per_source: int) -> Iterator[list[socket.socket]]:
    """``per_source`` silent connections from each address in ``sources``, closed on exit."""
    socks: list[socket.socket] = []
    try:
        for source in sources:
            for _ in range(per_source):
                socks.append(connect_from(source, port))
        yield socks
    finally:
        for sock in socks:
            sock.close()


def closed_by_peer(sock: socket.socket) -> bool:
    """Whether the receiver has closed ``sock`` (EOF or reset), without blocking."""
    try:
        data = sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK)
    except BlockingIOError:
        return False
    except (ConnectionResetError, BrokenPipeError):
        return True
    return data == b""


def associate(
    port: int, *, calling_ae: str = "PEER", source: str = "127.0.0.1", called_ae: str = "TRIAGED"
) -> tuple[AE, Association]:
    """A Verification association from ``source`` (established, rejected or aborted: the caller looks)."""
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(VERIFICATION)
    ae.acse_timeout = ae.network_timeout = 60
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae, bind_address=(source, 0))
    return ae, assoc


def rejection(assoc: Association) -> tuple[int, int, int]:
    """(result, source, reason) of the A-ASSOCIATE-RJ that ``assoc`` (a requestor) received."""
    assert assoc.is_rejected, "the association was not rejected"
    primitive = assoc.acceptor.primitive
    assert primitive is not None
    return int(primitive.result), int(primitive.result_source), int(primitive.diagnostic)


def close(ae: AE, assoc: Association) -> None:
    if assoc.is_established:
        assoc.release()
    sock = assoc.dul.socket.socket if assoc.dul.socket is not None else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.close()
    ae.shutdown()


@functools.cache
def real_request() -> bytes:
    """The A-ASSOCIATE-RQ PDU pynetdicom sends, read off a plain socket (the real bytes, not a hand encoding).

    Captured on first use (during a test), not at import: collecting the suite opens no sockets.
    """
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = int(listener.getsockname()[1])
        ae = AE(ae_title="FUZZER")
        ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
        ae.acse_timeout = 5
        requester = threading.Thread(
            target=ae.associate, args=("127.0.0.1", port), kwargs={"ae_title": "TRIAGED"}, daemon=True
        )
        requester.start()
        conn, _ = listener.accept()
        with conn:
            header = recv_exactly(conn, 6)
            body = recv_exactly(conn, int.from_bytes(header[2:6], "big"))
        requester.join(30)
        ae.shutdown()
    return header + body


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    """Exactly ``n`` bytes from ``sock`` (``EOFError`` if the peer closes first)."""
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError("peer closed")
        data += chunk
    return data
