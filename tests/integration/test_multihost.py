"""triaged across hosts, for real networking: network namespaces on one switch (see tests/support/netns.py).

Hosts: ``db`` (a throwaway PostgreSQL cluster), ``recv1`` and ``recv2`` (``triaged serve`` with no workers),
``work1`` and ``work2`` (``triaged worker``); the test process is the sending PACS at the switch's ``.1``.
Storage is one shared directory, standing in for NFS or a ReadWriteMany volume. Small series and short leases
keep this the CI variant; ``benchmarks/multihost.py`` is the long variant (more series, the real model) and
reports series/hour and the failover time.

Needs root and ``ip netns`` (CI has both: a skip there fails the run).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pynetdicom import AE
from sqlalchemy import select

from tests.support.multihost import DICOM_PORT, SENDER_AE, Deployment, Lab, host_of
from tests.support.netns import PREFIX, NetnsUnavailableError, remove_stale, unavailable_reason
from tests.support.pg_host import pg_binary
from tests.support.pipeline_support import count, wait_for
from triaged.db.models import Association, Instance, JobState, Result, Series
from triaged.dicom.synthetic import write_mr_series
from triaged.outputs.send import close_socket, read_dicom_file

pytestmark = [pytest.mark.slow, pytest.mark.serial]

RECEIVERS = ("recv1", "recv2")
WORKERS = ("work1", "work2")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"multi-host test: {reason}")
    if pg_binary("initdb") is None or pg_binary("pg_ctl") is None:
        pytest.skip("multi-host test: needs the PostgreSQL server binaries initdb and pg_ctl")
    lab = Lab(tmp_path_factory.mktemp("lab"), (*RECEIVERS, *WORKERS))
    try:
        lab.start()  # cleans up after itself when it fails
    except NetnsUnavailableError as exc:
        pytest.skip(f"multi-host test: {exc}")
    try:
        yield lab
    finally:
        lab.stop()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from triaged.ml.api import build_random_model_dir

    return build_random_model_dir(tmp_path_factory.mktemp("model") / "random", seed=0)


@pytest.fixture
def deployment(lab: Lab, model_dir: Path, tmp_path: Path) -> Iterator[Deployment]:
    deployment = Deployment(lab, tmp_path, model_dir)
    try:
        yield deployment
    finally:
        deployment.close()


def _series(root: Path, n: int, *, slices: int = 2, tag: str = "s") -> list[list[Path]]:
    rng = np.random.default_rng(zlib.crc32(tag.encode()))
    return [
        write_mr_series([rng.random((32, 32)) for _ in range(slices)], root / f"{tag}{i}", seed=f"mh-{tag}-{i}")
        for i in range(n)
    ]


def _send_concurrently(deployment: Deployment, batches: dict[str, list[list[Path]]]) -> None:
    """One sending thread per receiver host, each sending its series one association each."""
    errors: list[BaseException] = []

    def push(host: str, series: list[list[Path]]) -> None:
        try:
            for paths in series:
                deployment.send(host, paths)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=push, args=item) for item in batches.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def test_series_sent_to_both_receivers_are_processed_exactly_once(deployment: Deployment, tmp_path: Path) -> None:
    """Both workers hold their first job until each holds one (``worker.hold_file``), so both hosts work by
    construction; then they drain the queue. The database counts one done job and one result per series."""
    hold = tmp_path / "release"
    for host in RECEIVERS:
        deployment.start_receiver(host)
    for host in WORKERS:
        deployment.start_worker(host, hold_file=hold)
    series = _series(tmp_path / "src", 8)
    _send_concurrently(deployment, {"recv1": series[:4], "recv2": series[4:]})

    def holders() -> set[str]:
        return {host_of(j.lease_owner) for j in deployment.infer_jobs() if j.state == JobState.RUNNING}

    wait_for(lambda: holders() == set(WORKERS), timeout=120, what="each worker host holding a job")
    hold.touch()
    factory = deployment.session_factory
    wait_for(lambda: count(factory, Result) >= len(series), timeout=180, what="a result per series")
    # a graceful stop waits for jobs in flight: once both have exited no duplicate attempt can still surface
    assert [deployment.terminate(h) for h in WORKERS] == [0, 0]
    jobs = deployment.infer_jobs()
    assert len(jobs) == len(series)
    assert all(j.state == JobState.DONE and j.attempts == 1 for j in jobs), [(j.state, j.attempts) for j in jobs]
    assert {host_of(j.lease_owner) for j in jobs} == set(WORKERS)
    with factory() as session:
        result_series = list(session.scalars(select(Result.series_id)))
        receivers = {host_of(a.receiver_id) for a in session.scalars(select(Association))}
        assert count(factory, Series) == len(series)
    assert sorted(result_series) == sorted({int(j.series_id or 0) for j in jobs})
    assert receivers == set(RECEIVERS)


def test_cutting_a_worker_link_mid_job_lets_the_other_finish_after_the_lease(
    deployment: Deployment, tmp_path: Path
) -> None:
    """The job's holder (the *victim*: whichever worker claimed it) waits on its own hold file, which exists
    only at the end: it cannot finish first, however fast the machine. Its link goes down; the other worker
    (the *rescuer*) may run the job only once a reaper re-queued it, after the victim's lease expired.

    The order is read from a trigger-kept audit of the jobs table (the database's own record), not from
    clocks in the test. Then the victim's link comes back and its hold ends: its late attempt must not add
    a second result: its completion, which would commit its results, is refused (``LeaseLostError``).
    """
    deployment.install_job_audit()
    holds = {host: tmp_path / f"release-{host}" for host in WORKERS}
    deployment.start_receiver("recv1")
    for host in WORKERS:
        deployment.start_worker(host, hold_file=holds[host])
    [paths] = _series(tmp_path / "src", 1, tag="cut")
    deployment.send("recv1", paths)
    wait_for(
        lambda: [j.state for j in deployment.infer_jobs()] == [JobState.RUNNING],
        timeout=120,
        what="the job claimed",
    )
    [job] = deployment.infer_jobs()
    victim = host_of(job.lease_owner)
    [rescuer] = set(WORKERS) - {victim}
    deployment.network.set_link(victim, up=False)
    holds[rescuer].touch()
    factory = deployment.session_factory
    wait_for(lambda: count(factory, Result) == 1, timeout=180, what="the rescuer's result")

    deployment.network.set_link(victim, up=True)
    holds[victim].touch()
    late = deployment.processes[victim]
    wait_for(lambda: "LeaseLostError" in late.log_text(), timeout=120, what="the victim's late completion refused")
    assert deployment.terminate(victim) == 0
    assert deployment.terminate(rescuer) == 0
    [done] = deployment.infer_jobs()
    assert (done.state, done.attempts, host_of(done.lease_owner)) == (JobState.DONE, 2, rescuer)
    assert count(factory, Result) == 1

    audit = deployment.job_audit(job.id)
    transitions = [(a["old_state"], a["new_state"], host_of(a["new_owner"]) if a["new_owner"] else None) for a in audit]
    assert transitions == [
        (None, "queued", None),
        ("queued", "running", victim),
        ("running", "queued", None),  # the reaper
        ("queued", "running", rescuer),
        ("running", "done", rescuer),
    ], transitions
    _, _, reaped, reclaimed, _ = audit
    victim_lease = reaped["old_lease_expires_at"]  # the victim's last heartbeat extended it to here
    assert host_of(reaped["old_owner"]) == victim
    assert victim_lease < reaped["new_run_after"]  # reaped only once expired (its reaper's clock)
    assert victim_lease < reaped["at"]  # ... and the database's clock agrees
    assert victim_lease < reclaimed["new_heartbeat_at"]  # the rescuer claimed it after the expiry
    assert reaped["new_run_after"] <= reclaimed["new_heartbeat_at"]


def _send_until_killed(deployment: Deployment, host: str, paths: list[Path], kill_after: int) -> list[str]:
    """Send ``paths`` on one association; SIGKILL the receiver after ``kill_after`` acks. Return acked UIDs."""
    files = [read_dicom_file(p) for p in paths]
    ae = AE(ae_title=SENDER_AE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(files[0].sop_class_uid, files[0].transfer_syntax_uid)
    assoc = ae.associate(deployment.address(host), DICOM_PORT, ae_title="TRIAGED")
    assert assoc.is_established
    acked: list[str] = []
    killer: threading.Thread | None = None
    for item in files:
        if not assoc.is_established:
            break
        if assoc.send_c_store(item.path).get("Status") == 0:
            acked.append(item.sop_instance_uid)
        if len(acked) == kill_after and killer is None:
            killer = threading.Thread(target=deployment.kill9, args=(host,))  # while the next C-STOREs fly
            killer.start()
    if killer is not None:
        killer.join()
    if assoc.is_established:
        assoc.abort()
    close_socket(assoc)
    ae.shutdown()
    return acked


def test_receiver_killed_mid_association_loses_nothing_acknowledged(deployment: Deployment, tmp_path: Path) -> None:
    """``recv1`` dies (SIGKILL) in the middle of an association; ``recv2`` receives a whole series meanwhile.

    Every instance ``recv1`` acknowledged has its row and its intact file on the shared storage. The sender
    then sends the interrupted series again, to ``recv2``; once ``recv1`` is back (it closes the association
    its predecessor left open) that series completes too, and each series is processed once.
    """
    for host in RECEIVERS:
        deployment.start_receiver(host)
    deployment.start_worker("work1")
    [interrupted] = _series(tmp_path / "a", 1, slices=60, tag="kill")
    [other] = _series(tmp_path / "b", 1, slices=10, tag="other")

    other_sent = threading.Event()

    def send_other() -> None:
        deployment.send("recv2", other)
        other_sent.set()

    sender = threading.Thread(target=send_other)
    sender.start()
    acked = _send_until_killed(deployment, "recv1", interrupted, kill_after=20)
    sender.join()
    assert other_sent.is_set(), "recv2 refused instances while recv1 died"
    assert 20 <= len(acked) < len(interrupted)

    factory = deployment.session_factory
    with factory() as session:
        rows = {i.sop_instance_uid: i for i in session.scalars(select(Instance))}
    assert set(acked) <= set(rows), "an acknowledged instance is missing from the database"
    for row in rows.values():
        data = (deployment.shared_storage / row.file_path).read_bytes()
        assert (hashlib.sha256(data).hexdigest(), len(data)) == (row.sha256, row.size_bytes)
    wait_for(lambda: count(factory, Result) == 1, timeout=120, what="recv2's series processed")

    deployment.send("recv2", interrupted)  # the PACS retries the failed association on the other node
    deployment.start_receiver("recv1")  # the restarted host closes the association its predecessor left open
    wait_for(lambda: count(factory, Result) == 2, timeout=120, what="the interrupted series processed")
    assert deployment.terminate("work1") == 0
    jobs = deployment.infer_jobs()
    assert [(j.state, j.attempts) for j in jobs] == [(JobState.DONE, 1)] * 2
    with factory() as session:
        assert count(factory, Instance) == len(interrupted) + len(other)
        assert sorted(session.scalars(select(Series.instance_count))) == sorted([len(other), len(interrupted)])


def test_namespaces_of_a_dead_run_are_removed_and_a_live_runs_are_kept() -> None:
    """A crashed run (its pytest process gone) leaves namespaces with a process inside; the next run deletes
    both. Namespaces named after a live process (another run going on now) are not touched."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"multi-host test: {reason}")
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale, live = f"{PREFIX}{dead.pid}-crashed", f"{PREFIX}{os.getpid()}-alive"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    subprocess.run(["ip", "netns", "add", live], check=True)
    sleeper = subprocess.Popen(["ip", "netns", "exec", stale, "sleep", "300"])
    try:
        wait_for(lambda: _namespace_pids(stale) == [sleeper.pid], timeout=30, what="a process in the namespace")
        removed = remove_stale()
        assert stale in removed and live not in removed
        assert sleeper.wait(timeout=30) == -signal.SIGKILL
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
        assert stale not in listed and live in listed
    finally:
        sleeper.kill()
        sleeper.wait()
        subprocess.run(["ip", "netns", "del", stale], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", live], capture_output=True, check=False)


def _namespace_pids(namespace: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True, check=False).stdout
    return [int(p) for p in out.split()]
