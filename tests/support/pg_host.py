"""A throwaway PostgreSQL cluster (``initdb`` + ``pg_ctl``) started inside one network namespace host.

PostgreSQL refuses to run as root, so the cluster belongs to the ``postgres`` system user when there is one
(the Debian server package creates it), else ``nobody``. Its directory is a fresh ``mkdtemp`` outside pytest's
root-only temp tree, so that user can reach it. It listens only on the host's namespace address (and a Unix
socket in its own directory), and trusts only the test subnet. ``fsync`` is off: no test crashes PostgreSQL
itself (the durability under test is triaged's, up to a committed transaction).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from tests.support.netns import Network

PG_BIN_DIRS = ("/usr/local/bin", *sorted(str(p) for p in Path("/usr/lib/postgresql").glob("*/bin")))


def pg_binary(name: str) -> str | None:
    for directory in PG_BIN_DIRS:
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which(name)


def cluster_user() -> str:
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise RuntimeError("no postgres or nobody user to run PostgreSQL as")


@dataclass
class PostgresHost:
    network: Network
    host: str
    port: int = 5432
    user: str = field(default_factory=cluster_user)
    directory: Path = field(init=False)

    @property
    def address(self) -> str:
        return self.network.hosts[self.host].address

    @property
    def data_dir(self) -> Path:
        return self.directory / "data"

    def start(self) -> None:
        initdb, pg_ctl = pg_binary("initdb"), pg_binary("pg_ctl")
        if initdb is None or pg_ctl is None:
            raise RuntimeError("initdb/pg_ctl not found (PostgreSQL server binaries)")
        self.directory = Path(tempfile.mkdtemp(prefix=f"{self.network.run_id}-pg-"))
        entry = pwd.getpwnam(self.user)
        os.chown(self.directory, entry.pw_uid, entry.pw_gid)
        as_user = ["runuser", "-u", self.user, "--"]
        subprocess.run(
            [*as_user, initdb, "-D", str(self.data_dir), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        settings = {
            "listen_addresses": f"'{self.address}'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.directory}'",
            "fsync": "off",
            "max_connections": "100",
        }
        with (self.data_dir / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
        (self.data_dir / "pg_hba.conf").write_text(
            f"local all all trust\nhost all all {self.network.subnet} trust\n", encoding="utf-8"
        )
        log = self.directory / "postgres.log"
        subprocess.run(
            self.network.command(self.host, [pg_ctl, "-D", str(self.data_dir), "-l", str(log), "-w", "start"],
                                 user=self.user),
            check=True,
            capture_output=True,
            timeout=120,
        )  # fmt: skip

    def url(self, database: str, *, driver: str = "postgresql+psycopg") -> str:
        """A URL with connect and TCP user timeouts: a host whose link is cut notices within seconds."""
        return f"{driver}://postgres@{self.address}:{self.port}/{database}?connect_timeout=5&tcp_user_timeout=5000"

    def create_database(self) -> str:
        name = f"mh_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(
            f"host={self.address} port={self.port} user=postgres dbname=postgres", autocommit=True
        ) as c:
            c.execute(f"CREATE DATABASE {name}")
        return name

    def stop(self) -> None:
        pg_ctl = pg_binary("pg_ctl")
        if not hasattr(self, "directory"):
            return
        if pg_ctl is not None and (self.data_dir / "postmaster.pid").exists():
            subprocess.run(
                ["runuser", "-u", self.user, "--", pg_ctl, "-D", str(self.data_dir), "-m", "immediate", "-w", "stop"],
                capture_output=True,
                timeout=60,
                check=False,
            )
        pid_file = self.data_dir / "postmaster.pid"
        if pid_file.exists():  # pg_ctl failed: kill the postmaster ourselves
            with contextlib.suppress(ValueError, ProcessLookupError, OSError):
                os.kill(int(pid_file.read_text().split()[0]), 9)
                time.sleep(0.5)
        shutil.rmtree(self.directory, ignore_errors=True)
