"""ReceiverPool: several receiver processes on one port (SO_REUSEPORT), with real peers and a real database."""

from __future__ import annotations

import errno
import os
import signal
import socket
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from tests.conftest import free_port
from tests.support.connections import associate, close, rejection
from tests.support.receiver import (
    dataset_bytes,
    dcmtk,
    instance_rows,
    receiver_settings,
    run_dcmtk,
    send,
    synthetic_series,
    wait_for,
)
from triaged import metrics
from triaged.config import Settings, load_settings
from triaged.daemon import Daemon
from triaged.db.engine import make_engine, make_session_factory
from triaged.db.models import Association, utcnow
from triaged.db.schema import upgrade
from triaged.errors import ConfigError
from triaged.outputs.send import SendResult, close_socket, read_dicom_file
from triaged.receive.pool import ReceiverPool, ReceiverStartError
from triaged.receive.scp import Receiver
from triaged.receive.storage import InstanceStore

N_ASSOCIATIONS = 16
PER_ASSOCIATION = 2


def _settings(make_settings: Callable[..., Settings], db_url: str, processes: int = 2) -> Settings:
    return receiver_settings(
        make_settings,
        dicom={"max_associations": 32, "receiver_processes": processes},
        database={"url": db_url},
        log_level="warning",
    )


@contextmanager
def running_pool(settings: Settings, session_factory: sessionmaker[Session] | None) -> Iterator[ReceiverPool]:
    pool = ReceiverPool(settings, session_factory, port=0, stop_timeout=5)
    pool.start()
    try:
        yield pool
    finally:
        pool.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _received_count() -> float:
    return metrics.REGISTRY.get_sample_value("triaged_instances_received_total") or 0.0


def _associations(session_factory: sessionmaker[Session]) -> list[Association]:
    with session_factory() as session:
        return list(session.scalars(select(Association).order_by(Association.id)))


def _send_concurrently(pool: ReceiverPool, series: list[list[Path]], *, dcmtk_every: int = 0) -> list[SendResult]:
    """One association per series, all at once; every ``dcmtk_every``-th peer is dcmtk's storescu."""
    storescu = dcmtk("storescu") if dcmtk_every else ""
    results: list[SendResult] = []
    failures: list[str] = []
    barrier = threading.Barrier(len(series))

    def peer(index: int) -> None:
        barrier.wait()
        if dcmtk_every and index % dcmtk_every == 0:
            args = [storescu, "-aet", f"DCMTK{index:02d}", "-aec", "TRIAGED", "127.0.0.1", str(pool.port)]
            proc = run_dcmtk(args + [str(p) for p in series[index]])
            if proc.returncode != 0:
                failures.append(proc.stderr)
            return
        results.extend(send(pool, series[index], calling_ae=f"PEER{index:02d}"))  # type: ignore[arg-type]

    threads = [threading.Thread(target=peer, args=(i,)) for i in range(len(series))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not failures, failures
    return results


def test_two_processes_store_16_concurrent_associations(tmp_path, make_settings, db_url, session_factory):
    settings = _settings(make_settings, db_url)
    series = [synthetic_series(tmp_path / f"s{i}", PER_ASSOCIATION, seed=300 + i) for i in range(N_ASSOCIATIONS)]
    source = {read_dicom_file(p).sop_instance_uid: p for paths in series for p in paths}
    received_before = _received_count()
    with running_pool(settings, session_factory) as pool:
        pids = pool.pids
        assert len(pids) == 2 and all(_alive(pid) for pid in pids)
        results = _send_concurrently(pool, series, dcmtk_every=4)
        assert len(results) == (N_ASSOCIATIONS - N_ASSOCIATIONS // 4) * PER_ASSOCIATION
        assert all(r.status == 0 for r in results), [r for r in results if r.status != 0]
        wait_for(lambda: sum(a.closed_at is not None for a in _associations(session_factory)) == N_ASSOCIATIONS)
        port = pool.port
    # stop() leaves no child behind, and nothing listens on the port any more.
    assert not any(_alive(pid) for pid in pids)
    assert _received_count() - received_before == len(source)  # the children's counters reach our /metrics
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()

    rows = instance_rows(session_factory)
    assert sorted(r.sop_instance_uid for r in rows) == sorted(source)  # one row per instance
    for row in rows:
        stored = settings.storage_dir / row.file_path
        assert dataset_bytes(stored) == dataset_bytes(source[row.sop_instance_uid])
    receiver_ids = {a.receiver_id for a in _associations(session_factory)}
    # 16 connections all hashed to one process would be a 2**-15 chance.
    assert receiver_ids == {f"{pool.receiver_id}:0", f"{pool.receiver_id}:1"}


def test_killed_child_is_restarted_and_closes_its_stale_associations(tmp_path, make_settings, db_url, session_factory):
    settings = _settings(make_settings, db_url)
    item = read_dicom_file(synthetic_series(tmp_path / "held", 1, seed=1)[0])
    with running_pool(settings, session_factory) as pool:
        # Hold associations open until each process has at least one (the kernel picks the process), so
        # neither check below can pass vacuously on an empty set.
        ae = AE(ae_title="HOLDER")
        ae.add_requested_context(item.sop_class_uid, item.transfer_syntax_uid)
        held: list[Any] = []
        victim_id = f"{pool.receiver_id}:0"
        try:
            while len({a.receiver_id for a in _associations(session_factory)}) < 2:
                assert len(held) < 64, "64 connections all landed on one process"
                held.append(ae.associate("127.0.0.1", pool.port, ae_title="TRIAGED"))
                assert held[-1].is_established
                wait_for(lambda: len(_associations(session_factory)) == len(held))
            on_victim = sum(a.receiver_id == victim_id for a in _associations(session_factory))
            assert 0 < on_victim < len(held)
            assert pool.associations_in_use() == len(held)
            victim_pid = pool.pids[0]
            os.kill(victim_pid, signal.SIGKILL)
            wait_for(lambda: pool.restarts == 1, timeout=30)
            assert victim_pid not in pool.pids and len(pool.pids) == 2
            # The restarted process closed the rows its predecessor left open; the other process's stay open.
            rows = _associations(session_factory)
            assert sum(a.closed_at is not None for a in rows if a.receiver_id == victim_id) == on_victim
            assert sum(a.closed_at is None for a in rows if a.receiver_id != victim_id) == len(held) - on_victim
            # The dead child's slots were given back with its row of the shared table; the others' are held.
            assert pool.associations_in_use() == len(held) - on_victim
        finally:
            for assoc in held:
                assoc.abort()
                close_socket(assoc)
            ae.shutdown()
        # The port keeps accepting, on both processes again (the restarted one included: 1 - 2**-15).
        series = [synthetic_series(tmp_path / f"s{i}", 1, seed=500 + i) for i in range(N_ASSOCIATIONS)]
        results = _send_concurrently(pool, series)
        assert len(results) == N_ASSOCIATIONS and all(r.status == 0 for r in results)
        wait_for(
            lambda: sum(a.closed_at is not None for a in _associations(session_factory)) == len(held) + N_ASSOCIATIONS
        )
    later = _associations(session_factory)[len(held) :]
    assert {a.receiver_id for a in later} == {f"{pool.receiver_id}:0", f"{pool.receiver_id}:1"}
    assert len(instance_rows(session_factory)) == N_ASSOCIATIONS


def test_max_associations_holds_in_total_over_three_processes(make_settings, db_url, session_factory):
    """16 means 16 wherever the kernel puts them (it used to be ceil(16 / 3) = 6 per process, 18 in all)."""
    settings = receiver_settings(
        make_settings,
        dicom={"max_associations": 16, "receiver_processes": 3},
        database={"url": db_url},
        log_level="warning",
    )
    held: list[tuple[AE, Any]] = []
    with running_pool(settings, session_factory) as pool:
        try:
            for index in range(16):
                held.append(associate(pool.port, calling_ae=f"HOLD{index:02d}"))
                assert held[-1][1].is_established, f"association {index + 1} of 16 was refused"
            wait_for(lambda: len(_associations(session_factory)) == 16)
            per_process = Counter(a.receiver_id for a in _associations(session_factory))
            # Spread over the processes (all 16 on one: a 3**-15 chance), so no single one enforced it alone.
            assert len(per_process) >= 2, per_process
            assert pool.associations_in_use() == 16
            # The 17th, 18th, ...: each lands on some process, and each is refused, transiently.
            for index in range(6):
                ae, extra = associate(pool.port, calling_ae=f"EXTRA{index}")
                assert rejection(extra) == (0x02, 0x03, 0x02)
                close(ae, extra)
            ae, last = held.pop()
            close(ae, last)
            wait_for(lambda: pool.associations_in_use() == 15)
            held.append(associate(pool.port, calling_ae="AGAIN"))
            assert held[-1][1].is_established
        finally:
            for ae, assoc in held:
                close(ae, assoc)
    assert len(_associations(session_factory)) == 17  # rejected requests leave no association row


@pytest.mark.parametrize("processes", [1, 2])
def test_start_closes_associations_an_earlier_run_left_open(make_settings, sqlite_url, tmp_path, processes):
    """Whatever the earlier process count was: ``base`` (1 process) and ``base:<i>`` rows, but not others';
    the same whether this start is one in-process receiver or a pool."""
    engine = make_engine(sqlite_url)
    upgrade(engine)
    session_factory = make_session_factory(engine)
    ids = ["pool-test", "pool-test:0", "pool-test:7", "pool-test-other:0", "other:pool-test:0"]
    with session_factory.begin() as session:
        for receiver_id in ids:
            session.add(
                Association(calling_ae_title="X", peer_address="p", receiver_id=receiver_id, opened_at=utcnow())
            )
    settings = _settings(make_settings, sqlite_url, processes)
    if processes == 1:
        receiver: Receiver | ReceiverPool = Receiver(
            settings, session_factory, InstanceStore(settings.storage_dir, 0), receiver_id="pool-test", port=0
        )
    else:
        receiver = ReceiverPool(settings, session_factory, receiver_id="pool-test", port=0)
    receiver.start()
    receiver.stop()
    engine.dispose()
    closed = {a.receiver_id: a.closed_at is not None for a in _associations(session_factory)}
    assert closed == dict(zip(ids, [True, True, True, False, False], strict=True))


def test_start_raises_when_the_port_is_taken(make_settings, sqlite_url):
    settings = _settings(make_settings, sqlite_url)
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        pool = ReceiverPool(settings, port=other.getsockname()[1])
        with pytest.raises(OSError) as raised:
            pool.start()
    assert raised.value.errno == errno.EADDRINUSE
    assert pool.pids == []


def test_start_raises_when_a_child_cannot_start(tmp_path, make_settings):
    """A database without the schema: the child fails at its first query, start() says why and cleans up."""
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    make_engine(url).dispose()
    pool = ReceiverPool(_settings(make_settings, url), port=0)
    with pytest.raises(
        ReceiverStartError, match=r"receiver process 0 failed to start: OperationalError: .*associations"
    ):
        pool.start()
    assert pool.pids == []


def test_receiver_processes_must_be_at_least_one():
    with pytest.raises(ConfigError, match=r"^config error: dicom\.receiver_processes: .*greater than or equal to 1$"):
        load_settings(None, dicom={"receiver_processes": 0})
    assert load_settings(None).dicom.receiver_processes == 1


def test_daemon_uses_the_pool_for_more_than_one_process(make_settings, sqlite_url):
    upgrade_engine = make_engine(sqlite_url)
    upgrade(upgrade_engine)
    upgrade_engine.dispose()
    settings = _settings(make_settings, sqlite_url, processes=2)
    settings = settings.model_copy(
        update={
            "worker": settings.worker.model_copy(update={"count": 0}),
            "http": settings.http.model_copy(update={"enabled": False}),
            "dicom": settings.dicom.model_copy(update={"port": free_port()}),
        }
    )
    daemon = Daemon(settings, housekeeping=False)
    daemon.start()
    try:
        assert isinstance(daemon.receiver, ReceiverPool)
        pids = daemon.receiver.pids
        assert len(pids) == 2
    finally:
        daemon.stop(grace_seconds=1)
    assert not any(_alive(pid) for pid in pids)
