"""Multi-host throughput and failover: the long variant of tests/integration/test_multihost.py.

Run from the repository root, as root:
    .venv/bin/python -m benchmarks.multihost [--series 20] [--slices 24] [--model random|shipped|DIR] [--lease 10]

The same namespace hosts as the test (PostgreSQL host, two receivers, two workers, shared storage directory).

* series/hour with one and with two worker hosts: all series are sent (half to each receiver) and queued
  first; the workers hold their first job until each holds one, so start-up is not counted; the clock runs
  from releasing them to the last job's ``finished_at`` in the database.
  ``worker_cpu_seconds_per_series`` is the workers' CPU time over the same span, per series: on a shared
  machine the less load-dependent number (series/hour per core = 3600 / it).
* failover: one series, the holding worker's link is cut (``ip link set eth0 down``) and the other worker is
  free to run it; reported from the cut to the re-claim (the job audit trigger's database clock) and to the
  result, next to the lease that had to run out first.

Prints one JSON object. Every phase also checks what the test checks: one done job and one result per series.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from tests.support.multihost import Deployment, Lab, host_of
from tests.support.netns import unavailable_reason
from tests.support.pipeline_support import count, wait_for
from triaged.config import DEFAULT_MODEL_DIR
from triaged.db.models import Job, JobKind, JobState, Result
from triaged.demo_phantom import phantom_series
from triaged.dicom.synthetic import write_mr_series

RECEIVERS = ("recv1", "recv2")
WORKERS = ("work1", "work2")


def _series(work: Path, n: int, slices: int, tag: str) -> list[list[Path]]:
    return [
        write_mr_series(phantom_series(slices, lesion=i % 2 == 0, seed=i), work / f"{tag}{i}", seed=f"mhb-{tag}-{i}")
        for i in range(n)
    ]


def _send_all(deployment: Deployment, series: list[list[Path]]) -> None:
    def push(host: str, batch: list[list[Path]]) -> None:
        for paths in batch:
            deployment.send(host, paths)

    halves = {RECEIVERS[0]: series[0::2], RECEIVERS[1]: series[1::2]}
    threads = [threading.Thread(target=push, args=item) for item in halves.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _check_exactly_once(deployment: Deployment, n: int) -> None:
    jobs = deployment.infer_jobs()
    assert len(jobs) == n and all(j.state == JobState.DONE for j in jobs), [(j.id, j.state) for j in jobs]
    with deployment.session_factory() as session:
        results = session.scalar(select(func.count(func.distinct(Result.series_id))))
    assert results == n == count(deployment.session_factory, Result), (results, n)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (and its waited-for children), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def throughput(lab: Lab, work: Path, model: Path, workers: int, series: list[list[Path]]) -> dict[str, Any]:
    deployment = Deployment(lab, work / f"throughput-{workers}", model, lease_seconds=60, heartbeat_seconds=5)
    try:
        for host in RECEIVERS:
            deployment.start_receiver(host)
        _send_all(deployment, series)
        factory = deployment.session_factory
        wait_for(lambda: count(factory, Job, Job.kind == JobKind.INFER) == len(series), timeout=300, what="queued")
        hold = deployment.root / "release"
        for host in WORKERS[:workers]:
            deployment.start_worker(host, hold_file=hold)
        wait_for(
            lambda: sum(j.state == JobState.RUNNING for j in deployment.infer_jobs()) == workers,
            timeout=300,
            what="every worker holding a job",
        )
        cpu_before = sum(_cpu_seconds(deployment.processes[h].proc.pid) for h in WORKERS[:workers])
        released = datetime.now(UTC)
        hold.touch()
        wait_for(lambda: count(factory, Result) == len(series), timeout=3600, what="all results", interval=0.5)
        cpu = sum(_cpu_seconds(deployment.processes[h].proc.pid) for h in WORKERS[:workers]) - cpu_before
        for host in WORKERS[:workers]:
            deployment.terminate(host)
        _check_exactly_once(deployment, len(series))
        jobs = deployment.infer_jobs()
        last = max(j.finished_at for j in jobs if j.finished_at is not None)
        seconds = (last - released).total_seconds()
        per_host = {h: sum(host_of(j.lease_owner) == h for j in jobs) for h in WORKERS[:workers]}
        return {
            "worker_hosts": workers,
            "series": len(series),
            "seconds": round(seconds, 2),
            "series_per_hour": round(len(series) / seconds * 3600, 1),
            "series_per_host": per_host,
            "worker_cpu_seconds_per_series": round(cpu / len(series), 2),
        }
    finally:
        deployment.close()


def failover(lab: Lab, work: Path, model: Path, lease: float, slices: int) -> dict[str, Any]:
    deployment = Deployment(lab, work / "failover", model, lease_seconds=lease, heartbeat_seconds=max(0.5, lease / 5))
    try:
        deployment.install_job_audit()
        holds = {host: deployment.root / f"release-{host}" for host in WORKERS}
        deployment.start_receiver(RECEIVERS[0])
        for host in WORKERS:
            deployment.start_worker(host, hold_file=holds[host])
        [paths] = _series(work / "failover-src", 1, slices, "failover")
        deployment.send(RECEIVERS[0], paths)
        wait_for(lambda: [j.state for j in deployment.infer_jobs()] == [JobState.RUNNING], timeout=300, what="claim")
        [job] = deployment.infer_jobs()
        victim = host_of(job.lease_owner)
        [rescuer] = set(WORKERS) - {victim}
        cut = datetime.now(UTC)
        deployment.network.set_link(victim, up=False)
        holds[rescuer].touch()
        factory = deployment.session_factory
        wait_for(lambda: count(factory, Result) == 1, timeout=600, what="rescuer's result")
        deployment.network.set_link(victim, up=True)
        holds[victim].touch()
        for host in WORKERS:
            deployment.terminate(host)
        _check_exactly_once(deployment, 1)
        audit = deployment.job_audit(job.id)
        reaped = next(a for a in audit if a["old_state"] == "running" and a["new_state"] == "queued")
        reclaimed = next(a for a in audit if a["new_state"] == "running" and host_of(a["new_owner"]) == rescuer)
        [done] = deployment.infer_jobs()
        assert done.finished_at is not None and host_of(done.lease_owner) == rescuer
        return {
            "lease_seconds": lease,
            "lease_left_at_cut_s": round((reaped["old_lease_expires_at"] - cut).total_seconds(), 2),
            "cut_to_reclaim_s": round((reclaimed["at"] - cut).total_seconds(), 2),
            "cut_to_result_s": round((done.finished_at - cut).total_seconds(), 2),
        }
    finally:
        deployment.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--series", type=int, default=20)
    parser.add_argument("--slices", type=int, default=24)
    parser.add_argument("--model", default="random", help="random (a tiny random CNN), shipped, or a model dir")
    parser.add_argument("--lease", type=float, default=10.0, help="lease seconds in the failover phase")
    args = parser.parse_args(argv)
    reason = unavailable_reason()
    if reason is not None:
        raise SystemExit(f"multihost benchmark: {reason}")
    with tempfile.TemporaryDirectory(prefix="triaged-multihost-") as tmp:
        work = Path(tmp)
        if args.model == "random":
            from triaged.ml.api import build_random_model_dir

            model = build_random_model_dir(work / "model", seed=0)
        else:
            model = DEFAULT_MODEL_DIR if args.model == "shipped" else Path(args.model)
        series = _series(work / "src", args.series, args.slices, "t")
        lab = Lab(work / "lab", (*RECEIVERS, *WORKERS))
        lab.start()
        try:
            started = time.perf_counter()
            one = throughput(lab, work, model, 1, series)
            two = throughput(lab, work, model, 2, series)
            report = {
                "model": json.loads((model / "model.json").read_text(encoding="utf-8")).get("name", str(model)),
                "slices_per_series": args.slices,
                "one_worker_host": one,
                "two_worker_hosts": two,
                "speedup": round(two["series_per_hour"] / one["series_per_hour"], 2),
                "failover": failover(lab, work, model, args.lease, args.slices),
                "wall_seconds": round(time.perf_counter() - started, 1),
            }
        finally:
            lab.stop()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
