"""The idle-connection attack of issue 12 against a real ``triaged serve``: does a real sender still get in?

    python benchmarks/idle_connections.py                       # 100 idle connections from 10 addresses
    python benchmarks/idle_connections.py --idle 100 --sources 1  # all from one address
    python benchmarks/idle_connections.py --src /tmp/main-src     # the same against another checkout

Starts ``python -m triaged serve`` (default settings apart from port, data directory, no workers, no HTTP)
on a migrated SQLite database, then, each with dcmtk (``TCP_NODELAY=1``): ``echoscu`` and a ``storescu`` of
N instances on one association, (a) with no idle connections, (b) while ``--idle`` TCP connections that
never send an A-ASSOCIATE-RQ are held open from ``--sources`` loopback addresses (127.0.0.2 and up), and
(c) right after those are closed. Prints exit codes, wall times and the instance rows in the database.
``--src`` runs the server from another source tree (e.g. ``git archive main | tar -x -C DIR``) with this
virtual environment, so the same attack can be measured before and after a change. Not a test: on demand.
"""

from __future__ import annotations

import argparse
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _timed(args: list[str], env: dict[str, str]) -> tuple[int, float]:
    start = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600, check=False)
    return proc.returncode, time.perf_counter() - start


def _rows(db: Path) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute("SELECT count(*) FROM instances").fetchone()[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle", type=int, default=100, help="idle TCP connections to hold open")
    parser.add_argument("--sources", type=int, default=10, help="loopback source addresses to spread them over")
    parser.add_argument("-n", "--instances", type=int, default=20, help="instances per storescu run")
    parser.add_argument("--src", type=Path, default=REPO_ROOT, help="source tree whose triaged serves")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(REPO_ROOT))
    from triaged.dicom.synthetic import write_mr_series

    with tempfile.TemporaryDirectory(prefix="triaged-idle-") as tmp:
        root = Path(tmp)
        port = _free_port()
        env = {
            **os.environ,
            "TCP_NODELAY": "1",
            "PYTHONPATH": str(args.src.resolve()),
            "TRIAGED_DATA_DIR": str(root / "data"),
            "TRIAGED_DICOM__PORT": str(port),
            "TRIAGED_DICOM__BIND_ADDRESS": "127.0.0.1",
            "TRIAGED_WORKER__COUNT": "0",
            "TRIAGED_HTTP__ENABLED": "false",
            "TRIAGED_STORAGE__MIN_FREE_BYTES": "0",
            "TRIAGED_LOG_LEVEL": "warning",
        }
        src = str(args.src.resolve())  # also the working directory: ``python -m`` puts it first on sys.path
        subprocess.run(
            [sys.executable, "-m", "triaged", "db", "upgrade"], env=env, cwd=src, check=True, capture_output=True
        )
        rng = np.random.default_rng(0)
        batches = [
            write_mr_series([rng.random((64, 64)) for _ in range(args.instances)], root / f"s{i}", seed=i)
            for i in range(3)
        ]
        log = (root / "serve.log").open("w")
        server = subprocess.Popen([sys.executable, "-m", "triaged", "serve"], env=env, cwd=src, stdout=log, stderr=log)
        package = subprocess.run(
            [sys.executable, "-c", "import triaged; print(triaged.__file__)"],
            env=env,
            cwd=src,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        echo = ["echoscu", "-aet", "LEGIT", "-aec", "TRIAGED", "127.0.0.1", str(port)]
        store = ["storescu", "-aet", "LEGIT", "-aec", "TRIAGED", "127.0.0.1", str(port)]
        try:
            deadline = time.monotonic() + 120
            while _timed(echo, env)[0] != 0:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"triaged serve did not answer C-ECHO; see {root / 'serve.log'}")
                time.sleep(0.2)
            db = root / "data" / "triaged.db"
            print(f"server: {package}  idle: {args.idle} from {args.sources} address(es)  n: {args.instances}")

            def run(phase: str, batch: list[Path]) -> None:
                before = _rows(db)
                echo_rc, echo_s = _timed(echo, env)
                store_rc, store_s = _timed(store + [str(p) for p in batch], env)
                stored = _rows(db) - before
                print(
                    f"{phase:<28} echoscu rc={echo_rc} {echo_s:6.2f} s   "
                    f"storescu rc={store_rc} {store_s:6.2f} s  stored {stored}/{len(batch)}"
                )

            run("(a) no idle connections", batches[0])
            idle: list[socket.socket] = []
            refused_at_once = 0
            for index in range(args.idle):
                sock = socket.socket()
                sock.bind((f"127.0.0.{2 + index % args.sources}", 0))
                sock.connect(("127.0.0.1", port))
                idle.append(sock)
            time.sleep(1.0)  # let the server accept them all
            for sock in idle:
                try:
                    refused_at_once += sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK) == b""
                except BlockingIOError:
                    pass
                except ConnectionResetError:
                    refused_at_once += 1
            print(f"idle connections closed by the server at once: {refused_at_once}/{args.idle}")
            run(f"(b) {args.idle} idle held open", batches[1])
            for sock in idle:
                sock.close()
            run("(c) right after closing them", batches[2])
        finally:
            server.terminate()
            server.wait(60)
            log.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
