"""Run `triaged serve` / `triaged worker` as subprocesses with a temp config; send series to them."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import MODEL_CACHE_DIR
from triaged.outputs.send import read_dicom_file, send_files

_LISTENING = re.compile(r"^triaged listening: (?P<rest>.*)$")
_DICOM_PORT = re.compile(r"DICOM \S+ on [\d.]+:(?P<port>\d+)")
_HTTP_PORT = re.compile(r"HTTP on http://[\d.]+:(?P<port>\d+)")
REPO_ROOT = Path(__file__).resolve().parents[2]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # a table below a section (e.g. dicom.peers) as an inline table
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(str(value))


def write_config(path: Path, sections: dict[str, Any]) -> Path:
    """A TOML file from ``{"key": value, "section": {"key": value}}``; deeper tables are written inline."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in sections.items() if not isinstance(v, dict)]
    for name, table in sections.items():
        if isinstance(table, dict):
            lines.append(f"\n[{name}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def daemon_config(
    tmp_path: Path,
    *,
    db_url: str,
    model_dir: Path,
    dicom_port: int,
    workers: int = 1,
    **overrides: dict[str, Any],
) -> Path:
    sections: dict[str, Any] = {
        "data_dir": str(tmp_path / "data"),
        "log_format": "json",
        "dicom": {"bind_address": "127.0.0.1", "port": dicom_port, "ae_title": "TRIAGED"},
        "database": {"url": db_url},
        "storage": {"min_free_bytes": 0},
        "series": {"quiet_seconds": 1.0, "sweep_interval_seconds": 0.25},
        "worker": {"count": workers, "torch_threads": 1, "poll_seconds": 0.1, "heartbeat_seconds": 1.0},
        "model": {
            "directory": str(model_dir),
            "device": "cpu",
            "precision": "fp32",
            "cam_top_k": 2,
            "cache_dir": str(MODEL_CACHE_DIR),
        },
        "outputs": {"mode": "none"},
        "http": {"bind_address": "127.0.0.1", "port": 0, "public_metrics": True},
    }
    for name, values in overrides.items():
        sections[name] = {**sections.get(name, {}), **values}
    return write_config(tmp_path / f"triaged-{time.monotonic_ns()}.toml", sections)


@dataclass
class DaemonProcess:
    proc: subprocess.Popen[str]
    log_path: Path
    dicom_port: int | None = None
    http_port: int | None = None
    lines: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    def http_get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=5) as response:
                return int(response.status), response.read().decode()
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read().decode()

    def terminate(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        self._join_reader()
        return code

    def kill9(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self._join_reader()

    def _join_reader(self) -> None:
        if self.reader is not None:
            self.reader.join(timeout=10)

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")


def start_daemon(
    config: Path,
    command: Sequence[str] = ("serve",),
    *,
    log_path: Path,
    ready_timeout: float = 90,
    wrap: Callable[[list[str]], list[str]] | None = None,
) -> DaemonProcess:
    """Start ``python -m triaged -c CONFIG <command>`` and wait for its ``triaged listening`` line.

    ``wrap`` turns the command line into another that execs it (e.g. inside a network namespace).
    """
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TCP_NODELAY": "1"}
    log_file = log_path.open("w", encoding="utf-8")
    argv = [sys.executable, "-m", "triaged", "-c", str(config), *command]
    proc = subprocess.Popen(
        wrap(argv) if wrap is not None else argv,
        stdout=subprocess.PIPE,
        stderr=log_file,
        text=True,
        cwd=REPO_ROOT,
        env=env,
    )
    log_file.close()
    daemon = DaemonProcess(proc=proc, log_path=log_path)
    ready = threading.Event()

    def _reader() -> None:
        assert proc.stdout is not None
        with proc.stdout:
            for line in proc.stdout:
                daemon.lines.append(line.rstrip("\n"))
                if _LISTENING.match(line.strip()):
                    if (m := _DICOM_PORT.search(line)) is not None:
                        daemon.dicom_port = int(m.group("port"))
                    if (m := _HTTP_PORT.search(line)) is not None:
                        daemon.http_port = int(m.group("port"))
                    ready.set()

    daemon.reader = threading.Thread(target=_reader, daemon=True)
    daemon.reader.start()
    deadline = time.monotonic() + ready_timeout
    while not ready.wait(0.2):
        if proc.poll() is not None or time.monotonic() > deadline:
            daemon.kill9()
            raise AssertionError(f"daemon did not start (rc={proc.returncode}):\n{daemon.log_text()[-4000:]}")
    return daemon


@contextmanager
def running_daemon(
    config: Path, command: Sequence[str] = ("serve",), *, log_path: Path, expect_clean_exit: bool = True
) -> Iterator[DaemonProcess]:
    daemon = start_daemon(config, command, log_path=log_path)
    try:
        yield daemon
    finally:
        if daemon.proc.poll() is None:
            code = daemon.terminate()
            if expect_clean_exit:
                assert code == 0, f"exit status {code}:\n{daemon.log_text()[-4000:]}"
        else:
            daemon.kill9()


def send_series(port: int, paths: Sequence[Path], *, calling_ae: str = "TESTSCU") -> None:
    results = send_files(
        [read_dicom_file(p) for p in paths],
        "127.0.0.1",
        port,
        called_ae_title="TRIAGED",
        calling_ae_title=calling_ae,
    )
    bad = [r for r in results if r.status != 0]
    assert not bad, bad
