"""Shared fixtures: real SQLite files and the real PostgreSQL server, free ports, ../shared/data.

CI sets ``TRIAGED_STRICT_SKIPS=1``: there every skip (missing ../shared/data, dcmtk, Orthanc, PostgreSQL)
becomes a failure, except GPU tests on a machine without CUDA.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from triaged.config import Settings, load_settings
from triaged.db.engine import make_engine, make_session_factory
from triaged.db.schema import upgrade

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
POSTGRES_URL = os.environ.get("TRIAGED_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
STRICT_SKIPS = os.environ.get("TRIAGED_STRICT_SKIPS") == "1"
# One ONNX/OpenVINO cache for every daemon the tests start: the model is exported once, not once per daemon
# (files are keyed by the weights' sha256 and the torch version and written atomically, so sharing is safe).
MODEL_CACHE_DIR = Path(tempfile.gettempdir()) / f"triaged-tests-model-cache-{os.getuid()}"


def shared_data() -> Path:
    """Path of ../shared/data, or skip (fail in CI) with the reason."""
    if not (SHARED_DATA / "README.md").is_file():
        pytest.skip(f"needs ../shared/data beside the repository (looked in {SHARED_DATA})")
    return SHARED_DATA


@pytest.fixture
def shared_data_dir() -> Path:
    return shared_data()


def _strict_failure(report: pytest.TestReport | pytest.CollectReport, what: str) -> None:
    reason = getattr(report, "wasxfail", None) or report.longrepr
    if isinstance(reason, tuple):  # (path, line, message) of a skip
        reason = reason[2]
    report.outcome = "failed"
    report.longrepr = f"{what} not allowed in CI (TRIAGED_STRICT_SKIPS=1): {str(reason).removeprefix('Skipped: ')}"
    if hasattr(report, "wasxfail"):
        del report.wasxfail  # else pytest would still count it as xfailed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Iterator[None]:
    """Strict mode: a skip (marker, fixture, imperative, ``importorskip`` inside a test) or an xfail
    (marker or imperative ``pytest.xfail``) fails the test; only GPU tests may skip where CUDA is missing."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if STRICT_SKIPS and report.skipped and item.get_closest_marker("gpu") is None:
        _strict_failure(report, "xfail" if hasattr(report, "wasxfail") else "skip")


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Iterator[None]:
    """Strict mode: a module that skips itself while being collected (``pytest.skip(allow_module_level=True)``,
    a module-level ``importorskip``) is a collection error, not a silently missing file."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if STRICT_SKIPS and report.skipped:
        _strict_failure(report, "skip")


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Undo configure_logging() done by a test (e.g. through the CLI), so the next test starts clean."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    if root.handlers != handlers:
        root.handlers[:] = handlers
        root.setLevel(level)
        structlog.reset_defaults()


_HANDED_OUT: set[int] = set()
_PICKED_PORTS = random.Random()  # its own generator: tests that seed `random` must not make ports repeat


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux default


def free_port() -> int:
    """A TCP port on loopback for a server that must be told its port before it starts (Orthanc, a config file).

    Prefer port 0 wherever the server can report the port it bound (pynetdicom ``start_server``, ``triaged
    serve`` with ``dicom.port = 0``): nothing can take it in between. A port from bind-to-0 is the worst choice
    here: it lies in the kernel's ephemeral range, so any outgoing connection (an association, an HTTP probe, a
    PostgreSQL session) may take it as its source port before the server binds it, or while a server is
    restarted on "the same port". So the port comes from outside that range, is checked bindable now and is
    never handed out twice by this process; only another process choosing ports the same way could race it.
    """
    low, high = _ephemeral_range()
    candidates = range(20000, low) if low > 21000 else range(high + 1, 65536)
    for _ in range(200):
        port = _PICKED_PORTS.choice(candidates) if len(candidates) > 1000 else 0
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            port = int(sock.getsockname()[1])
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError("no free TCP port found on 127.0.0.1")


def _postgres_available() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'triaged.db'}"


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh schema in the `test` database, dropped afterwards."""
    if not _postgres_available():
        pytest.skip("needs PostgreSQL on 127.0.0.1:5432 (database test)")
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = make_engine(POSTGRES_URL)
    with admin.begin() as connection:
        connection.exec_driver_sql(f"CREATE SCHEMA {schema}")
    try:
        yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as connection:
            connection.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Parametrises a test over a real SQLite file and the real PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'triaged.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """An engine on a database migrated to head."""
    eng = make_engine(db_url)
    upgrade(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def session_factory(engine: Engine) -> sessionmaker[Session]:
    return make_session_factory(engine)


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    """Settings rooted in a temp data dir; keyword overrides as nested dicts."""

    def factory(**overrides: Any) -> Settings:
        overrides.setdefault("data_dir", tmp_path / "data")
        overrides["model"] = {"cache_dir": MODEL_CACHE_DIR, **overrides.get("model", {})}
        return load_settings(None, **overrides)

    return factory
