"""Pipeline throughput and latency on PostgreSQL: 1 vs 2 worker processes, and release → result latency.

Run from the repository root (PostgreSQL on 127.0.0.1:5432, database ``test``; ../shared/data present):

    .venv/bin/python -m benchmarks.pipeline [--series 8] [--slices 24] [--quiet 2] [--model DIR]

Throughput: `triaged serve --workers 0` receives and sweeps; 1 then 2 `triaged worker` processes (one torch
thread each) process ``--series`` series of ``--slices`` slices sent by C-STORE in one association. The
clock runs from the start of the send to the last result committed; series/hour and the 2-vs-1 ratio are
printed (target >= 1.7x on 2 cores). Worker processes, not threads, are what scale: torch's thread pool
is per process and one model instance serialises its calls.

Latency: one series to `triaged serve --workers 1` (torch using every core); from association release
(send returned) to the result row committed. Target <= quiet period + 5 s on CPU. Each phase uses a
fresh PostgreSQL schema.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from tests.conftest import POSTGRES_URL
from tests.support.pipeline_daemon import daemon_config, running_daemon, send_series
from tests.support.pipeline_support import LABELS, kaggle_files, labelled_series, shipped_model_available
from triaged.config import DEFAULT_MODEL_DIR
from triaged.db.engine import make_engine, make_session_factory
from triaged.db.models import Job, JobKind, Result
from triaged.db.schema import upgrade


@contextmanager
def fresh_schema() -> Iterator[tuple[str, sessionmaker[Session]]]:
    schema = f"bench_{uuid.uuid4().hex[:10]}"
    admin = make_engine(POSTGRES_URL)
    with admin.begin() as connection:
        connection.exec_driver_sql(f"CREATE SCHEMA {schema}")
    url = f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    engine = make_engine(url)
    upgrade(engine)
    try:
        yield url, make_session_factory(engine)
    finally:
        engine.dispose()
        with admin.begin() as connection:
            connection.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        admin.dispose()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc), to show how much CPU the workers actually got."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def results(factory: sessionmaker[Session]) -> int:
    with factory() as session:
        return int(session.scalar(select(func.count()).select_from(Result)) or 0)


def wait_results(factory: sessionmaker[Session], n: int, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while results(factory) < n:
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {n} results")
        time.sleep(0.05)
    return time.monotonic()


def make_series(work: Path, count: int, slices: int, tag: str) -> list[list[Path]]:
    out = []
    for index in range(count):
        label = LABELS[index % len(LABELS)]
        files = (kaggle_files(label) * 2)[index : index + slices]
        out.append(labelled_series(work / f"{tag}{index}", files, seed=f"bench-{tag}-{index}-{uuid.uuid4()}"))
    return out


def throughput(
    work: Path, model: Path, processes: int, *, n_series: int, slices: int, quiet: float
) -> dict[str, float]:
    (work / f"w{processes}").mkdir(parents=True, exist_ok=True)
    series = make_series(work / f"w{processes}", n_series, slices, f"t{processes}-")
    with fresh_schema() as (url, factory):
        config = daemon_config(
            work / f"w{processes}",
            db_url=url,
            model_dir=model,
            dicom_port=0,
            workers=0,
            series={"quiet_seconds": quiet, "sweep_interval_seconds": 0.25},
        )
        with ExitStack() as stack:
            serve = stack.enter_context(running_daemon(config, log_path=work / f"serve-w{processes}.log"))
            pids = [
                stack.enter_context(running_daemon(config, ("worker",), log_path=work / f"worker{index}.log")).proc.pid
                for index in range(processes)
            ]
            assert serve.dicom_port is not None
            cpu_before = sum(cpu_seconds(pid) for pid in pids)
            started = time.monotonic()
            send_series(serve.dicom_port, [p for paths in series for p in paths])
            finished = wait_results(factory, n_series, timeout=1800)
            cpu_used = sum(cpu_seconds(pid) for pid in pids) - cpu_before
        with factory() as session:
            first_job = session.scalar(select(func.min(Job.created_at)).where(Job.kind == JobKind.INFER))
            last_result = session.scalar(select(func.max(Result.created_at)))
    seconds = finished - started
    assert first_job is not None and last_result is not None
    processing = (last_result - first_job).total_seconds()  # from the sweep's enqueue to the last result
    return {
        "workers": processes,
        "seconds": seconds,
        "series_per_hour": n_series * 3600 / seconds,
        "processing_seconds": processing,
        "processing_series_per_hour": n_series * 3600 / processing,
        "worker_cpu_seconds_per_series": cpu_used / n_series,
        "worker_cpu_utilisation": cpu_used / processing,  # cores the workers actually got while processing
    }


def latency(work: Path, model: Path, slices: int, quiet: float, runs: int) -> list[float]:
    (work / "latency").mkdir(parents=True, exist_ok=True)
    with fresh_schema() as (url, factory):
        config = daemon_config(
            work / "latency",
            db_url=url,
            model_dir=model,
            dicom_port=0,
            workers=1,
            series={"quiet_seconds": quiet, "sweep_interval_seconds": 0.25},
            worker={"torch_threads": os.cpu_count() or 1},  # one series alone: use every core
        )
        values = []
        with running_daemon(config, log_path=work / "serve-latency.log") as serve:
            assert serve.dicom_port is not None
            for run in range(runs):
                [paths] = make_series(work / "latency", 1, slices, f"l{run}-")
                send_series(serve.dicom_port, paths)  # returns after the association is released
                released = time.monotonic()
                values.append(wait_results(factory, run + 1, timeout=600) - released)
        return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--series", type=int, default=8)
    parser.add_argument("--slices", type=int, default=24)
    parser.add_argument("--quiet", type=float, default=2.0, help="series.quiet_seconds")
    parser.add_argument("--latency-runs", type=int, default=3)
    parser.add_argument("--model", type=Path, default=None)
    args = parser.parse_args()
    model = args.model or (DEFAULT_MODEL_DIR if shipped_model_available() else None)
    if model is None:
        raise SystemExit("no shipped model: pass --model DIR")
    with tempfile.TemporaryDirectory(prefix="triaged-bench-") as tmp:
        work = Path(tmp)
        one = throughput(work, model, 1, n_series=args.series, slices=args.slices, quiet=args.quiet)
        two = throughput(work, model, 2, n_series=args.series, slices=args.slices, quiet=args.quiet)
        lat = latency(work, model, args.slices, args.quiet, args.latency_runs)
    report = {
        "model": str(model),
        "series": args.series,
        "slices": args.slices,
        "quiet_seconds": args.quiet,
        "one_worker": one,
        "two_workers": two,
        "speedup": two["series_per_hour"] / one["series_per_hour"],
        "processing_speedup": two["processing_series_per_hour"] / one["processing_series_per_hour"],
        "latency_seconds": lat,
        "latency_median_seconds": sorted(lat)[len(lat) // 2],
        "latency_target_seconds": args.quiet + 5.0,
    }
    print(json.dumps(report, indent=2))
    print(
        f"1 worker: {one['series_per_hour']:.0f} series/h; 2 workers: {two['series_per_hour']:.0f} series/h "
        f"({report['speedup']:.2f}x end to end, {report['processing_speedup']:.2f}x queue to result; target >= 1.7x); "
        f"release -> result median {report['latency_median_seconds']:.2f} s "
        f"(target <= {report['latency_target_seconds']:.1f} s)"
    )


if __name__ == "__main__":
    main()
