"""`/healthz`, `/readyz` and `/metrics` on a small threaded HTTP server (stdlib; no web framework needed).

`/healthz` answers while the process runs; `/readyz` answers 200 only when every readiness check passes
(database reachable, schema current, model loaded, receiver listening) and lists them as JSON either way;
`/metrics` is the Prometheus text format of :data:`triaged.metrics.REGISTRY`.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from triaged.metrics import REGISTRY

log = structlog.get_logger()

ReadinessCheck = Callable[[], dict[str, str]]
"""Returns ``{check name: "ok" | reason}``; ready when every value is ``"ok"``."""


class HealthServer:
    def __init__(self, bind_address: str, port: int, readiness: ReadinessCheck) -> None:
        self._readiness = readiness
        handler = self._handler_class()
        self._server = ThreadingHTTPServer((bind_address, port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        readiness = self._readiness

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/healthz":
                    self._send(200, b"ok\n", "text/plain; charset=utf-8")
                elif path == "/readyz":
                    try:
                        checks = readiness()
                    except Exception as exc:  # a failing check must answer 503, not crash the thread
                        checks = {"readiness": f"{type(exc).__name__}: {exc}"}
                    ready = all(value == "ok" for value in checks.values())
                    body = json.dumps({"ready": ready, "checks": checks}, sort_keys=True).encode() + b"\n"
                    self._send(200 if ready else 503, body, "application/json")
                elif path == "/metrics":
                    self._send(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
                else:
                    self._send(404, b"not found\n", "text/plain; charset=utf-8")

            def _send(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                return  # probes every few seconds would flood the log

        return Handler
