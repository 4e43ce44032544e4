"""A test-controlled TCP proxy in front of a peer: the outage starts and ends the instant a test says so.

``down()`` cuts every open connection and answers each new one with a reset (as a stopped PACS would, but
without waiting for a process to stop or start); ``hang()`` accepts connections and never answers (a PACS
that is wedged); ``up()`` forwards again. Counters say how many connections were refused or left hanging, so
tests count attempts and probes instead of sleeping.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Literal

Mode = Literal["up", "down", "hang"]


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))  # the port is ours from here on: no free-port race
        self._listener.listen(64)
        self._listener.settimeout(0.1)
        self._mode: Mode = "up"
        self._changed = threading.Condition()
        self._open: list[socket.socket] = []
        self.refused = 0
        self.hung = 0
        self.forwarded = 0
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, name="tcp-proxy", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._listener.getsockname()[1])

    # -- control -------------------------------------------------------------------------------------
    def up(self) -> None:
        self._set("up")

    def down(self) -> None:
        self._set("down")

    def hang(self) -> None:
        self._set("hang")

    def _set(self, mode: Mode) -> None:
        with self._changed:
            self._mode = mode
            to_close, self._open = self._open, []
        for sock in to_close:
            _reset(sock)

    def wait_refused(self, count: int, timeout: float) -> int:
        """Block until at least ``count`` connections were refused (raise on the deadline); return the count."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self.refused < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"only {self.refused} of {count} connections refused within {timeout} s")
                self._changed.wait(left)
            return self.refused

    def close(self) -> None:
        self._closed = True
        self._thread.join(timeout=5)
        self._listener.close()
        self._set("down")

    # -- plumbing ------------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._changed:
                mode = self._mode
                if mode == "down":
                    self.refused += 1
                elif mode == "hang":
                    self.hung += 1
                    self._open.append(client)
                self._changed.notify_all()
            if mode == "down":
                _reset(client)
            elif mode == "up":
                self._forward(client)

    def _forward(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            _reset(client)
            return
        upstream.settimeout(None)
        client.settimeout(None)
        for sock in (client, upstream):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._changed:
            self.forwarded += 1
            self._open += [client, upstream]
        for source, sink in ((client, upstream), (upstream, client)):
            threading.Thread(target=_pump, args=(source, sink), name="tcp-proxy-pump", daemon=True).start()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    with suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
    with suppress(OSError):
        sink.shutdown(socket.SHUT_WR)


def _reset(sock: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0), so the peer sees the connection die at once."""
    with suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with suppress(OSError):
        sock.close()


@contextmanager
def running_proxy(target_host: str, target_port: int) -> Iterator[TcpProxy]:
    proxy = TcpProxy(target_host, target_port)
    try:
        yield proxy
    finally:
        proxy.close()
