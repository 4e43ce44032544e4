"""Serve the FastAPI app with uvicorn on a thread of the daemon (same ``http.bind_address``/``http.port``).

The socket is bound here, before the thread starts, so a port in use is an ``OSError`` from
:meth:`WebServer.start` (the CLI turns it into one line) and port 0 reports the port it got. uvicorn
installs no signal handlers off the main thread; the daemon's own SIGTERM handling stops it.
"""

from __future__ import annotations

import socket
import threading
import time

import uvicorn
from fastapi import FastAPI

from triaged.config import HttpSettings

START_TIMEOUT_SECONDS = 30.0


class WebServer:
    def __init__(self, app: FastAPI, http: HttpSettings) -> None:
        self._http = http
        self._config = uvicorn.Config(
            app,
            log_config=None,  # structlog owns logging; uvicorn's loggers propagate to it
            access_log=False,  # probes every few seconds would flood the log
            lifespan="off",
            ssl_certfile=str(http.tls_cert_file) if http.tls_cert_file else None,
            ssl_keyfile=str(http.tls_key_file) if http.tls_key_file else None,
            timeout_graceful_shutdown=5,
        )
        self._server = uvicorn.Server(self._config)
        self._socket: socket.socket | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._socket is None:
            raise RuntimeError("web server not started")
        return int(self._socket.getsockname()[1])

    @property
    def scheme(self) -> str:
        return "https" if self._http.tls_cert_file else "http"

    def start(self) -> None:
        family = socket.AF_INET6 if ":" in self._http.bind_address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self._http.bind_address, self._http.port))
        except OSError:
            sock.close()
            raise
        sock.listen(128)
        self._socket = sock
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, name="http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start (see the log)")
            time.sleep(0.01)

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._socket is not None:
            self._socket.close()
