"""Chaos (issue 12 item 4): SIGKILL the receiver, a worker or an exporter at random moments, restart it, count.

A sender pushes small synthetic MR series by C-STORE (and resends, as a modality would, whatever was not
answered 0x0000); `triaged serve` with workers off receives, `triaged worker` processes infer and export,
Orthanc receives the outputs (a Lua ``ReceivedInstanceFilter`` appends every incoming SOP Instance UID to a
file, so a second delivery of the same object is counted even though Orthanc stores it once). A seeded RNG
picks the victim and the moment; every victim is restarted at once. After the last kill everything settles
(waits on database states), then the counts are printed:

- acknowledged instances lost: the sender got 0x0000 but there is no row, or no file (must be 0);
- series with more than one result for one generation (must be 0);
- outputs marked sent that Orthanc never received (must be 0);
- jobs stuck: not done/dead/failed once the settle period ran out (must be 0);
- outputs delivered twice to Orthanc (reported: delivery is at-least-once with stable UIDs).

Run (PostgreSQL is the multi-process case; each run uses a fresh schema)::

    nice -n 10 .venv/bin/python -m benchmarks.chaos --kills 50 --seed 1

Exit status 1 when a must-be-0 count is not 0, 2 when a prerequisite (Orthanc, the database) is missing.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from tests.conftest import POSTGRES_URL, free_port
from tests.support.orthanc import Orthanc
from tests.support.pipeline_daemon import DaemonProcess, daemon_config, start_daemon
from triaged.config import load_settings
from triaged.db.engine import make_engine, make_session_factory
from triaged.db.models import Instance, Job, JobState, Output, Result
from triaged.db.schema import upgrade
from triaged.demo_phantom import phantom_series
from triaged.dicom.synthetic import write_mr_series
from triaged.outputs.send import read_dicom_file, send_files
from triaged.receive.storage import InstanceStore

SENDER_AE = "CHAOSSCU"
VICTIMS = ("receiver", "worker", "exporter")
FINAL_STATES = (JobState.DONE, JobState.DEAD, JobState.FAILED)

_LUA = """
function ReceivedInstanceFilter(dicom, origin, info)
  local f = io.open({path}, "a")
  f:write(dicom.SOPInstanceUID .. "\\n")
  f:close()
  return true
end
"""


@dataclass
class ChaosCounts:
    """What one run found; :meth:`failures` names every count that must be 0 and is not."""

    kills: dict[str, int]
    series: int
    acknowledged: int
    lost: int
    results: int
    duplicate_results: int
    outputs: int
    sent_not_received: int
    delivered_twice: int
    jobs: int
    stuck: int
    failed_jobs: int
    dead_jobs: int
    seconds: float
    stuck_states: dict[str, int] = field(default_factory=dict)

    def failures(self) -> list[str]:
        must_be_zero = ("lost", "duplicate_results", "sent_not_received", "stuck")
        return [f"{name}={getattr(self, name)}" for name in must_be_zero if getattr(self, name)]


class _Sender(threading.Thread):
    """Sends each series until every instance was answered 0x0000 (a modality retrying after failures)."""

    def __init__(self, port: int, series: list[list[Path]], stop: threading.Event, gap: float) -> None:
        super().__init__(name="chaos-sender", daemon=True)
        self.port, self.series, self.stop, self.gap = port, series, stop, gap
        self.acknowledged: set[str] = set()
        self.attempts = 0
        self.unsent: list[Path] = []

    def run(self) -> None:
        for paths in self.series:
            pending = list(paths)
            while pending and not self.stop.is_set():
                self.attempts += 1
                try:
                    results = send_files(
                        [read_dicom_file(p) for p in pending],
                        "127.0.0.1",
                        self.port,
                        called_ae_title="TRIAGED",
                        calling_ae_title=SENDER_AE,
                    )
                except Exception:  # refused or reset while the receiver is down: try again, as a modality would
                    results = []
                acked = {r.path for r in results if r.status == 0}
                self.acknowledged |= {r.sop_instance_uid for r in results if r.status == 0}
                pending = [p for p in pending if p not in acked]
                if pending:
                    self.stop.wait(0.3)
            self.unsent += pending
            self.stop.wait(self.gap)


def _series(root: Path, count: int, slices: int, seed: int) -> list[list[Path]]:
    """Phantom heads (every other one with a lesion): assessable, so each result has outputs to deliver."""
    return [
        write_mr_series(
            phantom_series(slices, size=128, lesion=bool(i % 2), seed=seed * 10_000 + i),
            root / f"s{i:04d}",
            seed=f"chaos-{seed}-{i}",
        )
        for i in range(count)
    ]


@contextmanager
def _database(kind: str, root: Path) -> Iterator[str]:
    """A fresh PostgreSQL schema (dropped afterwards), a SQLite file, or ``kind`` itself when it is a URL."""
    if "://" in kind:
        yield kind
        return
    if kind == "sqlite":
        yield f"sqlite:///{root / 'chaos.db'}"
        return
    schema = f"chaos_{uuid.uuid4().hex[:12]}"
    admin = make_engine(POSTGRES_URL)
    with admin.begin() as connection:
        connection.exec_driver_sql(f"CREATE SCHEMA {schema}")
    try:
        yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as connection:
            connection.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        admin.dispose()


def _settled(factory: sessionmaker[Session]) -> bool:
    with factory() as session:
        open_jobs = session.scalar(select(func.count()).select_from(Job).where(Job.state.not_in(FINAL_STATES)))
        unsent = session.scalar(select(func.count()).select_from(Output).where(Output.sent_at.is_(None)))
    return not open_jobs and not unsent


def _count(
    factory: sessionmaker[Session], store: InstanceStore, acknowledged: set[str], received: list[str]
) -> dict[str, object]:
    with factory() as session:
        files = dict(session.execute(select(Instance.sop_instance_uid, Instance.file_path)).tuples().all())
        per_generation = session.execute(
            select(Result.series_id, Result.generation, func.count()).group_by(Result.series_id, Result.generation)
        ).all()
        sent = list(session.scalars(select(Output.sop_instance_uid).where(Output.sent_at.is_not(None))))
        outputs = session.scalar(select(func.count()).select_from(Output)) or 0
        states = Counter(str(s) for s in session.scalars(select(Job.state)))
    lost = sum(1 for uid in acknowledged if uid not in files or not store.path_for(files[uid]).is_file())
    deliveries = Counter(received)
    return {
        "acknowledged": len(acknowledged),
        "lost": lost,
        "results": sum(n for _, _, n in per_generation),
        "duplicate_results": sum(1 for _, _, n in per_generation if n > 1),
        "outputs": outputs,
        "sent_not_received": sum(1 for uid in sent if uid not in deliveries),
        "delivered_twice": sum(1 for n in deliveries.values() if n > 1),
        "jobs": sum(states.values()),
        "stuck": sum(n for s, n in states.items() if s not in FINAL_STATES),
        "failed_jobs": states.get(str(JobState.FAILED), 0),
        "dead_jobs": states.get(str(JobState.DEAD), 0),
        "stuck_states": {s: n for s, n in states.items() if s not in FINAL_STATES},
    }


def run_chaos(
    root: Path,
    *,
    database: str = "postgres",
    kills: int = 50,
    seed: int = 1,
    series: int = 40,
    slices: int = 3,
    kill_gap: tuple[float, float] = (0.5, 4.0),
    series_gap: float = 1.0,
    settle_seconds: float = 180.0,
    log: bool = True,
) -> ChaosCounts:
    """One chaos run below ``root``; see the module docstring for what is counted.

    ``database`` is ``postgres`` (a fresh schema in the test database), ``sqlite`` or a database URL.
    """
    from triaged.ml.api import build_random_model_dir

    started = time.monotonic()
    rng = random.Random(seed)
    model = build_random_model_dir(root / "model", seed=0)
    received_log = root / "orthanc-received.txt"
    received_log.touch()
    lua = root / "count.lua"
    lua.write_text(_LUA.replace("{path}", json.dumps(str(received_log))), encoding="utf-8")
    orthanc = Orthanc(root / "orthanc", modalities={}, extra_config={"LuaScripts": [str(lua)]})
    orthanc.start()
    try:
        with _database(database, root) as db_url:
            engine = make_engine(db_url)
            upgrade(engine)
            factory = make_session_factory(engine)
            port = free_port()
            common: dict[str, dict[str, object]] = {
                "dicom": {
                    "peers": {"orthanc": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}}
                },
                "outputs": {"mode": "all", "destination": "orthanc"},
            }
            timing = {"lease_seconds": 3.0, "heartbeat_seconds": 0.5, "backoff_base_seconds": 0.5}
            timing["backoff_max_seconds"] = 2.0
            configs = {
                "receiver": daemon_config(
                    root, db_url=db_url, model_dir=model, dicom_port=port, workers=0, worker=timing, **common
                ),
                # exports too (export_count = 0): a kill can land in inference or in a send
                "worker": daemon_config(
                    root,
                    db_url=db_url,
                    model_dir=model,
                    dicom_port=port,
                    workers=1,
                    worker={**timing, "export_count": 0},
                    **common,
                ),
                # one infer thread and one export-only thread
                "exporter": daemon_config(
                    root,
                    db_url=db_url,
                    model_dir=model,
                    dicom_port=port,
                    workers=1,
                    worker={**timing, "export_count": 1},
                    **common,
                ),
            }
            commands = {"receiver": ("serve",), "worker": ("worker",), "exporter": ("worker",)}
            restarts = Counter[str]()

            def launch(name: str) -> DaemonProcess:
                restarts[name] += 1
                return start_daemon(configs[name], commands[name], log_path=root / f"{name}-{restarts[name]:03d}.log")

            procs = {name: launch(name) for name in VICTIMS}
            stop = threading.Event()
            sender = _Sender(port, _series(root / "src", series, slices, seed), stop, series_gap)
            sender.start()
            done_kills = Counter[str]()
            try:
                for number in range(kills):
                    time.sleep(rng.uniform(*kill_gap))  # a random moment, not a wait for correctness
                    victim = rng.choice(VICTIMS)
                    procs[victim].kill9()
                    done_kills[victim] += 1
                    procs[victim] = launch(victim)
                    if log:
                        print(f"kill {number + 1}/{kills}: {victim}", file=sys.stderr, flush=True)
                sender.join(timeout=settle_seconds)
                deadline = time.monotonic() + settle_seconds
                while not _settled(factory) and time.monotonic() < deadline:
                    time.sleep(0.5)
            finally:
                stop.set()
                sender.join(timeout=60)
                for proc in procs.values():
                    proc.terminate()
            settings = load_settings(configs["receiver"])
            store = InstanceStore(settings.storage_dir, 0)
            received = received_log.read_text(encoding="utf-8").split()
            counts = _count(factory, store, sender.acknowledged, received)
            engine.dispose()
    finally:
        orthanc.stop()
    return ChaosCounts(
        kills=dict(done_kills),
        series=series,
        seconds=round(time.monotonic() - started, 1),
        **counts,  # type: ignore[arg-type]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--series", type=int, default=60, help="series the sender pushes during the run")
    parser.add_argument("--slices", type=int, default=3)
    parser.add_argument("--database", choices=("postgres", "sqlite"), default="postgres")
    parser.add_argument("--settle-seconds", type=float, default=180.0)
    parser.add_argument("--keep", type=Path, help="run below this directory and keep it (logs)")
    args = parser.parse_args(argv)
    root = args.keep or Path(tempfile.mkdtemp(prefix="triaged-chaos-"))
    root.mkdir(parents=True, exist_ok=True)
    counts = run_chaos(
        root,
        database=args.database,
        kills=args.kills,
        seed=args.seed,
        series=args.series,
        slices=args.slices,
        settle_seconds=args.settle_seconds,
    )
    print(json.dumps(asdict(counts), indent=2))
    failures = counts.failures()
    if failures:
        print("FAIL: " + ", ".join(failures), file=sys.stderr)
        return 1
    print(f"ok: {sum(counts.kills.values())} kills, nothing acknowledged lost, no duplicate result", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
