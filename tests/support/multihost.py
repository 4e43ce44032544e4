"""A triaged deployment over several namespace hosts: one PostgreSQL host, receiver hosts, worker hosts.

:class:`Lab` is the part that is slow to build and can be shared by a module: the network (see
:mod:`tests.support.netns`) and the PostgreSQL host. :class:`Deployment` is one test's triaged processes on
it, against a database of their own. Receivers run ``triaged serve`` with ``worker.count = 0`` (they receive,
complete series and reap leases); workers run ``triaged worker``.

Storage is one directory of this machine that every host's ``storage.directory`` points at: the stand-in for
an NFS export or a Kubernetes ReadWriteMany volume. Namespaces separate the network, not the filesystem, so
this shows that the hosts need nothing from each other but the database and the shared storage; it does not
test NFS semantics (attribute caching, close-to-open consistency).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session, sessionmaker

from tests.support.netns import Network
from tests.support.pg_host import PostgresHost
from tests.support.pipeline_daemon import DaemonProcess, start_daemon, write_config
from triaged.db.engine import make_engine, make_session_factory
from triaged.db.models import Job, JobKind
from triaged.db.schema import upgrade
from triaged.outputs.send import read_dicom_file, send_files

DICOM_PORT = 11112
SENDER_AE = "MHSCU"
DB_HOST = "db"


@dataclass
class Lab:
    """Network namespaces for ``hosts`` plus ``db``, and a PostgreSQL cluster on ``db``."""

    root: Path
    hosts: Sequence[str]
    network: Network = field(default_factory=Network)
    postgres: PostgresHost = field(init=False)

    def start(self) -> None:
        self.network.create()
        try:
            for name in (DB_HOST, *self.hosts):
                self.network.add_host(name)
            self.postgres = PostgresHost(self.network, DB_HOST)
            self.postgres.start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if hasattr(self, "postgres"):
            self.postgres.stop()
        self.network.destroy()


@contextlib.contextmanager
def running_lab(root: Path, hosts: Sequence[str]) -> Iterator[Lab]:
    lab = Lab(root=root, hosts=hosts)
    lab.start()
    try:
        yield lab
    finally:
        lab.stop()


@dataclass
class Deployment:
    """One database on the testbed and the triaged processes of one test; :meth:`close` kills what is left."""

    lab: Lab
    root: Path
    model_dir: Path
    lease_seconds: float = 4.0
    heartbeat_seconds: float = 1.0
    database: str = field(init=False)
    processes: dict[str, DaemonProcess] = field(default_factory=dict)
    _engine: Engine | None = None

    def __post_init__(self) -> None:
        self.database = self.lab.postgres.create_database()
        self.shared_storage.mkdir(parents=True, exist_ok=True)
        upgrade(self.engine)

    @property
    def network(self) -> Network:
        return self.lab.network

    @property
    def shared_storage(self) -> Path:
        """Every host's ``storage.directory``: the stand-in for NFS or a ReadWriteMany volume."""
        return self.root / "shared-storage"

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = make_engine(self.lab.postgres.url(self.database))
        return self._engine

    @property
    def session_factory(self) -> sessionmaker[Session]:
        return make_session_factory(self.engine)

    def address(self, host: str) -> str:
        return self.network.hosts[host].address

    def config(self, host: str, *, workers: int, **worker: Any) -> Path:
        directory = self.root / "hosts" / host
        directory.mkdir(parents=True, exist_ok=True)
        sections: dict[str, Any] = {
            "data_dir": str(directory / "data"),
            "log_format": "json",
            "dicom": {"bind_address": self.address(host), "port": DICOM_PORT, "ae_title": "TRIAGED"},
            "database": {"url": self.lab.postgres.url(self.database)},
            "storage": {"directory": str(self.shared_storage), "min_free_bytes": 0},
            "series": {"quiet_seconds": 1.0, "sweep_interval_seconds": 0.25},
            "worker": {
                "count": workers,
                "torch_threads": 1,
                "poll_seconds": 0.1,
                "lease_seconds": self.lease_seconds,
                "heartbeat_seconds": self.heartbeat_seconds,
                **{k: str(v) if isinstance(v, Path) else v for k, v in worker.items()},
            },
            "model": {"directory": str(self.model_dir), "device": "cpu", "precision": "fp32", "cam_top_k": 1},
            "outputs": {"mode": "none"},
            "http": {"bind_address": "127.0.0.1", "port": 0},
        }
        return write_config(directory / "triaged.toml", sections)

    def start_receiver(self, host: str) -> DaemonProcess:
        """``triaged serve`` with no workers on ``host``, listening on the host's address."""
        return self._start(host, self.config(host, workers=0), ("serve",))

    def start_worker(self, host: str, **worker: Any) -> DaemonProcess:
        """``triaged worker`` on ``host`` (``worker`` settings such as ``hold_file`` override the defaults)."""
        return self._start(host, self.config(host, workers=1, **worker), ("worker",))

    def _start(self, host: str, config: Path, command: tuple[str, ...]) -> DaemonProcess:
        if host in self.processes and self.processes[host].proc.poll() is None:
            raise RuntimeError(f"{host} is running")
        log_path = self.root / "hosts" / host / f"{command[0]}-{len(self.processes)}.log"
        process = start_daemon(config, command, log_path=log_path, wrap=lambda argv: self.network.command(host, argv))
        self.processes[host] = process
        return process

    def terminate(self, host: str) -> int:
        """SIGTERM: a graceful stop waits for the job in flight (or releases its lease)."""
        return self.processes[host].terminate()

    def kill9(self, host: str) -> None:
        self.processes[host].kill9()

    def send(self, host: str, paths: Sequence[Path]) -> None:
        """One association from the test process (the root namespace host) to the receiver on ``host``."""
        results = send_files(
            [read_dicom_file(p) for p in paths],
            self.address(host),
            DICOM_PORT,
            called_ae_title="TRIAGED",
            calling_ae_title=SENDER_AE,
        )
        bad = [r for r in results if r.status != 0]
        if bad:
            raise AssertionError(f"{host} refused {len(bad)} of {len(results)} instances: {bad[:3]}")

    def infer_jobs(self) -> list[Job]:
        with self.session_factory() as session:
            jobs = list(session.scalars(select(Job).where(Job.kind == JobKind.INFER).order_by(Job.id)))
            session.expunge_all()
            return jobs

    def install_job_audit(self) -> None:
        """A trigger that records every change of a job's state or lease owner, with the database's clock.

        Test instrumentation only: lets a test read the lease a dead or cut-off worker held *before* the
        reaper and the next claim overwrote it, instead of racing to read it in time.
        """
        with self.engine.begin() as connection:
            for statement in _AUDIT_SQL.split("\n;\n"):
                connection.execute(text(statement))

    def job_audit(self, job_id: int) -> list[dict[str, Any]]:
        with self.engine.connect() as connection:
            rows = connection.execute(
                text("SELECT * FROM job_audit WHERE job_id = :id ORDER BY id"), {"id": job_id}
            ).mappings()
            return [dict(row) for row in rows]

    def close(self) -> None:
        """Kill every process still running (a test that failed half-way) and drop the engine."""
        for process in self.processes.values():
            if process.proc.poll() is None:
                process.kill9()
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None


def host_of(worker_id: str | None) -> str:
    """The host name in a worker or receiver id (``hostname:pid:index``)."""
    return str(worker_id).split(":", 1)[0]


_AUDIT_SQL = """
CREATE TABLE job_audit (
    id bigserial PRIMARY KEY,
    job_id integer NOT NULL,
    at timestamptz NOT NULL,
    old_state text,
    new_state text NOT NULL,
    old_owner text,
    new_owner text,
    old_lease_expires_at timestamptz,
    new_lease_expires_at timestamptz,
    new_run_after timestamptz,
    new_heartbeat_at timestamptz,
    attempts integer NOT NULL
)
;
CREATE FUNCTION job_audit_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' OR OLD.state IS DISTINCT FROM NEW.state OR OLD.lease_owner IS DISTINCT FROM NEW.lease_owner
    THEN
        INSERT INTO job_audit (job_id, at, old_state, new_state, old_owner, new_owner, old_lease_expires_at,
                               new_lease_expires_at, new_run_after, new_heartbeat_at, attempts)
        VALUES (NEW.id, clock_timestamp(),
                CASE WHEN TG_OP = 'UPDATE' THEN OLD.state::text END, NEW.state::text,
                CASE WHEN TG_OP = 'UPDATE' THEN OLD.lease_owner END, NEW.lease_owner,
                CASE WHEN TG_OP = 'UPDATE' THEN OLD.lease_expires_at END, NEW.lease_expires_at,
                NEW.run_after, NEW.heartbeat_at, NEW.attempts);
    END IF;
    RETURN NEW;
END $$
;
CREATE TRIGGER job_audit AFTER INSERT OR UPDATE ON jobs FOR EACH ROW EXECUTE FUNCTION job_audit_row();
"""
