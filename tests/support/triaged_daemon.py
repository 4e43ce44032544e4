"""`triaged serve` as a subprocess with a generated TOML config, for end-to-end tests and benchmarks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from tests.conftest import MODEL_CACHE_DIR, free_port
from triaged.db.engine import make_engine, make_session_factory
from triaged.db.models import Job, JobKind

TRIAGED = [sys.executable, "-m", "triaged"]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def _toml(sections: dict[str, Any], prefix: str = "") -> str:
    """A tiny TOML writer for nested dicts of scalars (enough for our configs)."""
    scalars = {k: v for k, v in sections.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in sections.items() if isinstance(v, dict)}
    lines = [f"[{prefix}]"] if prefix and scalars else []
    lines += [f"{key} = {_toml_value(value)}" for key, value in scalars.items()]
    text = "\n".join(lines) + ("\n\n" if lines else "")
    for key, table in tables.items():
        text += _toml(table, f"{prefix}.{key}" if prefix else key)
    return text


@dataclass
class TriagedDaemon:
    root: Path
    model_dir: Path
    peers: dict[str, dict[str, Any]]
    outputs: dict[str, Any] = field(default_factory=dict)
    quiet_seconds: float = 1.0
    dicom_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    worker: dict[str, Any] = field(default_factory=dict)
    dicom: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    database_url: str | None = None  # None: SQLite in the data directory (the daemon's default)
    process: subprocess.Popen[bytes] | None = None
    _engine: Engine | None = None

    @property
    def config_path(self) -> Path:
        return self.root / "triaged.toml"

    @property
    def log_path(self) -> Path:
        return self.root / "triaged.log"

    def write_config(self) -> None:
        config = {
            "data_dir": str(self.root / "data"),
            "log_format": "json",
            "dicom": {
                "ae_title": "TRIAGED",
                "bind_address": "127.0.0.1",
                "port": self.dicom_port,
                "accept_unknown_peers": False,
                "peers": self.peers,
                **self.dicom,
            },
            "storage": {"min_free_bytes": 0},
            **({"database": {"url": self.database_url}} if self.database_url else {}),
            "series": {"quiet_seconds": self.quiet_seconds, "sweep_interval_seconds": 0.25},
            "worker": {
                "count": 1,
                "poll_seconds": 0.1,
                "backoff_base_seconds": 1.0,
                "backoff_max_seconds": 2.0,
                **self.worker,
            },
            "model": {
                "directory": str(self.model_dir),
                "device": "cpu",
                "precision": "fp32",
                "cache_dir": str(MODEL_CACHE_DIR),
                **self.model,
            },
            "outputs": self.outputs,
            "http": {"enabled": True, "bind_address": "127.0.0.1", "port": self.http_port, "public_metrics": True},
        }
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(_toml(config), encoding="utf-8")

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*TRIAGED, "--config", str(self.config_path), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def start(self, timeout: float = 120.0) -> None:
        self.write_config()
        upgraded = self.cli("db", "upgrade")
        if upgraded.returncode != 0:
            raise RuntimeError(f"triaged db upgrade failed: {upgraded.stderr}")
        log = self.log_path.open("ab")
        env = {**os.environ, "TCP_NODELAY": "1"}
        self.process = subprocess.Popen(
            [*TRIAGED, "--config", str(self.config_path), "serve"], stdout=log, stderr=subprocess.STDOUT, env=env
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"triaged serve exited with {self.process.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/readyz", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"triaged not ready within {timeout} s: {self.log_tail()}")

    def stop(self, timeout: float = 60.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.is_file() else ""

    @property
    def session_factory(self) -> sessionmaker[Session]:
        if self._engine is None:
            self._engine = make_engine(self.database_url or f"sqlite:///{self.root / 'data' / 'triaged.db'}")
        return make_session_factory(self._engine)

    def export_jobs(self) -> list[Job]:
        with self.session_factory() as session:
            jobs = list(session.scalars(select(Job).where(Job.kind == JobKind.EXPORT).order_by(Job.id)))
            for job in jobs:
                session.expunge(job)
            return jobs


@contextmanager
def running_triaged(
    root: Path, model_dir: Path, peers: dict[str, dict[str, Any]], **kwargs: Any
) -> Iterator[TriagedDaemon]:
    daemon = TriagedDaemon(root=root, model_dir=model_dir, peers=peers, **kwargs)
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()
