"""Ingest benchmark: the same ``TCP_NODELAY=1 storescu`` sends N synthetic MR instances to triaged (durable),
dcmtk ``storescp`` and Orthanc, with one association and with four at once; prints instances/s and ratios.

    python benchmarks/ingest.py                 # N = 2000 (~132 KB each), all three receivers
    python benchmarks/ingest.py -n 500 --targets triaged,orthanc
    python benchmarks/ingest.py -n 1000 --targets triaged,orthanc --processes 1,2   # triaged with 1 and 2 processes
    python benchmarks/ingest.py -n 600 --targets orthanc,sink-fork,pynetdicom-null   # ceilings

Every receiver gets a fresh storage directory per run and ``TCP_NODELAY=1`` in its environment (dcmtk and
Orthanc disable Nagle's algorithm only then). triaged runs as its own process (the real
:class:`triaged.receive.scp.Receiver` on a migrated SQLite database, fsync on every instance); after each run
its instance rows are counted as a correctness check. ``--processes 1,2`` runs triaged once per count
(``dicom.receiver_processes``: above 1, a :class:`triaged.receive.pool.ReceiverPool` on one port). Not a test: run
on demand.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"receiver exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"port {port} did not open")


def make_instances(root: Path, n: int, size: int, groups: int) -> list[list[Path]]:
    """``n`` MR instances of ``size``² 16-bit pixels, split into ``groups`` series (one per association)."""
    from triaged.dicom.synthetic import write_mr_series

    rng = np.random.default_rng(0)
    base = rng.random((size, size))
    out = []
    per = n // groups
    for group in range(groups):
        slices = [base + 0.01 * i for i in range(per)]
        out.append(write_mr_series(slices, root / f"g{groups}-{group}", seed=f"bench-{groups}-{group}"))
    return out


def storescu(port: int, called: str, files: list[Path]) -> subprocess.Popen[bytes]:
    args = ["storescu", "-aet", "BENCH", "-aec", called, "127.0.0.1", str(port), *map(str, files)]
    return subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def timed_send(port: int, called: str, groups: list[list[Path]]) -> float:
    """Start one storescu per group at once; return instances per second over the slowest."""
    start = time.perf_counter()
    procs = [storescu(port, called, files) for files in groups]
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode(errors='replace')[-500:]}")
    elapsed = time.perf_counter() - start
    return sum(len(g) for g in groups) / elapsed


# ---------------------------------------------------------------------- receivers
@contextmanager
def triaged_receiver(workdir: Path, processes: int = 1) -> Iterator[tuple[int, str, Callable[[], int]]]:
    port_file = workdir / "port"
    settings = {
        "data_dir": str(workdir / "data"),
        "log_level": "warning",
        "storage": {"min_free_bytes": 0},
        "dicom": {"receiver_processes": processes},
    }
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve-triaged", json.dumps(settings), str(port_file)],
        env={**ENV, "PYTHONPATH": str(REPO_ROOT)},
        cwd=REPO_ROOT,
    )
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("triaged receiver did not start")
            time.sleep(0.05)
        yield int(port_file.read_text()), "TRIAGED", lambda: _count_rows(workdir / "data" / "triaged.db")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


@contextmanager
def _serving(
    proc: subprocess.Popen[bytes], port: int, called: str, count: Callable[[], int]
) -> Iterator[tuple[int, str, Callable[[], int]]]:
    """A receiver process already started: wait for its port, hand out (port, AE title, counter), stop it after."""
    try:
        wait_port(port, proc)
        yield port, called, count
    finally:
        proc.terminate()
        proc.wait(30)


@contextmanager
def pynetdicom_null_receiver(workdir: Path) -> Iterator[tuple[int, str, Callable[[], int]]]:
    """A bare pynetdicom SCP in its own process that answers every C-STORE 0x0000 and keeps nothing: the ceiling
    of any receiver built on pynetdicom's upper layer on this machine, whatever it does with the data."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve-pynetdicom-null", str(port)], env=ENV, cwd=REPO_ROOT)
    with _serving(proc, port, "NULLSCP", lambda: -1) as served:
        yield served


def serve_pynetdicom_null(port: int) -> None:
    """Child mode: pynetdicom with every storage context and a handler that only returns success."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title="NULLSCP")
    ae.supported_contexts = AllStoragePresentationContexts
    ae.add_supported_context(Verification)
    ae.maximum_pdu_size = 1 << 20
    ae.start_server(("127.0.0.1", port), block=True, evt_handlers=[(evt.EVT_C_STORE, lambda event: 0x0000)])


def _count_rows(db: Path) -> int:
    import sqlite3

    with sqlite3.connect(db) as conn:
        return int(conn.execute("SELECT count(*) FROM instances").fetchone()[0])


@contextmanager
def storescp_receiver(
    workdir: Path, options: tuple[str, ...] = (), stores: bool = True
) -> Iterator[tuple[int, str, Callable[[], int]]]:
    """dcmtk's storescp (C++, writes each instance without fsync); ``options`` add e.g. ``--fork``."""
    port = free_port()
    out = workdir / "out"
    out.mkdir()
    proc = subprocess.Popen(
        ["storescp", "+xa", *options, "-aet", "STORESCP", "-od", str(out), str(port)],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    with _serving(
        proc, port, "STORESCP", (lambda: sum(1 for _ in out.iterdir())) if stores else (lambda: -1)
    ) as served:
        yield served


@contextmanager
def orthanc_receiver(workdir: Path) -> Iterator[tuple[int, str, Callable[[], int]]]:
    port, http_port = free_port(), free_port()
    config = {
        "Name": "bench",
        "DicomAet": "ORTHANC",
        "DicomPort": port,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "index"),
        "DicomAlwaysAllowStore": True,
        "DicomCheckCalledAet": False,
    }
    (workdir / "orthanc.json").write_text(json.dumps(config))
    proc = subprocess.Popen(
        [shutil.which("Orthanc") or "/usr/sbin/Orthanc", str(workdir / "orthanc.json")],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    with _serving(proc, port, "ORTHANC", lambda: -1) as served:
        yield served


# Ceilings: "storescp-fork" is a C++ receiver that uses every core (one process per association) and never
# fsyncs; "sink-fork" (storescp --fork --ignore) reads each instance and answers success without storing it:
# what the sender and the machine allow any receiver at all. "pynetdicom-null" is the same for a receiver built on
# pynetdicom: its upper layer and a handler that answers 0x0000 and keeps nothing.
RECEIVERS: dict[str, Callable[[Path], Any]] = {
    "triaged": triaged_receiver,
    "storescp": storescp_receiver,
    "storescp-fork": partial(storescp_receiver, options=("--fork",)),
    "sink-fork": partial(storescp_receiver, options=("--fork", "--ignore"), stores=False),
    "orthanc": orthanc_receiver,
    "pynetdicom-null": pynetdicom_null_receiver,
}


def serve_triaged(settings_json: str, port_file: Path) -> None:
    """Child mode: run the real receiver (a pool of them for ``dicom.receiver_processes`` > 1) until SIGTERM."""
    from triaged.config import load_settings
    from triaged.daemon import ReceiverLike
    from triaged.db.engine import make_engine, make_session_factory
    from triaged.db.schema import upgrade
    from triaged.log import configure_logging
    from triaged.receive.pool import ReceiverPool
    from triaged.receive.scp import Receiver
    from triaged.receive.storage import InstanceStore

    settings = load_settings(None, **json.loads(settings_json))
    configure_logging("warning", "console")
    engine = make_engine(settings.database_url)
    upgrade(engine)
    session_factory = make_session_factory(engine)
    receiver: ReceiverLike
    if settings.dicom.receiver_processes > 1:
        receiver = ReceiverPool(settings, session_factory, port=0)
    else:
        store = InstanceStore(settings.storage_dir, settings.storage.min_free_bytes)
        receiver = Receiver(settings, session_factory, store, port=0)
    receiver.start()
    # multiprocessing's resource tracker (started with the pool's first child) unblocks SIGTERM/SIGINT.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    port_file.with_suffix(".tmp").write_text(str(receiver.port))
    port_file.with_suffix(".tmp").rename(port_file)
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    receiver.stop()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-triaged":
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        serve_triaged(sys.argv[2], Path(sys.argv[3]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--serve-pynetdicom-null":
        serve_pynetdicom_null(int(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=2000, help="instances per run (default 2000)")
    parser.add_argument("--size", type=int, default=256, help="rows = columns (256 gives ~132 KB)")
    parser.add_argument("--targets", default="triaged,storescp,orthanc")
    parser.add_argument("--repeat", type=int, default=1, help="runs per configuration; the median is printed")
    parser.add_argument(
        "--processes", default="1", help="triaged receiver processes, comma-separated to compare (e.g. 1,2)"
    )
    args = parser.parse_args()
    counts = [int(n) for n in args.processes.split(",") if n.strip()]
    receivers: dict[str, Callable[[Path], Any]] = {}
    for target in (t.strip() for t in args.targets.split(",") if t.strip()):
        if target != "triaged":
            receivers[target] = RECEIVERS[target]
            continue
        for n in counts:
            receivers["triaged" if n == 1 else f"triaged-x{n}"] = partial(triaged_receiver, processes=n)
    targets = list(receivers)
    for tool in ["storescu"] + (["storescp"] if any(t.startswith(("storescp", "sink")) for t in targets) else []):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found: apt-get install dcmtk")
    with tempfile.TemporaryDirectory(prefix="triaged-bench-") as tmp:
        root = Path(tmp)
        print(f"writing {args.n} instances ({args.size}x{args.size}, 16 bit) ...", flush=True)
        data = {groups: make_instances(root / "src", args.n, args.size, groups) for groups in (1, 4)}
        size_kb = data[1][0][0].stat().st_size / 1024
        print(f"instance size {size_kb:.0f} KiB; sender: TCP_NODELAY=1 storescu; receivers with TCP_NODELAY=1")
        rates: dict[tuple[str, int], float] = {}
        for target in targets:
            for groups in (1, 4):
                runs = []
                for attempt in range(args.repeat):
                    workdir = root / f"{target}-{groups}-{attempt}"
                    workdir.mkdir()
                    with receivers[target](workdir) as (port, called, count):
                        rate = timed_send(port, called, data[groups])
                        stored = count()
                    if stored not in (-1, sum(len(g) for g in data[groups])):
                        raise RuntimeError(f"{target} stored {stored} of {args.n}")
                    runs.append(rate)
                    shutil.rmtree(workdir, ignore_errors=True)
                rates[target, groups] = statistics.median(runs)
                print(f"  {target:11s} {groups} association(s): {rates[target, groups]:7.1f} instances/s", flush=True)
        print()
        print(f"{'receiver':12s} {'1 assoc':>10s} {'4 assoc':>10s}   (instances/s, N={args.n})")
        for target in targets:
            print(f"{target:12s} {rates[target, 1]:10.1f} {rates[target, 4]:10.1f}")
        if "orthanc" in targets:  # the target, to hold against the ceilings above
            print(f"1.5x Orthanc: {1.5 * rates['orthanc', 1]:.1f} (1 association), {1.5 * rates['orthanc', 4]:.1f} (4)")
        for baseline in ("orthanc", "storescp", "storescp-fork", "sink-fork", "pynetdicom-null"):
            for mine in (t for t in targets if t.startswith("triaged")):
                if baseline in targets:
                    ratio_1 = rates[mine, 1] / rates[baseline, 1]
                    ratio_4 = rates[mine, 4] / rates[baseline, 4]
                    print(f"{mine} / {baseline}: {ratio_1:.2f}x (1 association), {ratio_4:.2f}x (4 associations)")


if __name__ == "__main__":
    main()
