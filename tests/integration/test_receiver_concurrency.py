"""25 associations at once, from pynetdicom and dcmtk peers: every instance stored once, every row right."""

from __future__ import annotations

import hashlib
import threading

import pytest
from sqlalchemy import select

from tests.support.receiver import (
    dcmtk,
    instance_rows,
    receiver_settings,
    run_dcmtk,
    running_receiver,
    send,
    synthetic_series,
    wait_for,
)
from triaged.db.models import Association, Series
from triaged.outputs.send import SendResult

N_ASSOCIATIONS = 25
PER_ASSOCIATION = 4


def test_25_concurrent_associations_all_stored(tmp_path, make_settings, session_factory):
    settings = receiver_settings(make_settings, dicom={"max_associations": 32})
    series = [synthetic_series(tmp_path / f"s{i}", PER_ASSOCIATION, seed=100 + i) for i in range(N_ASSOCIATIONS)]
    storescu = dcmtk("storescu")
    results: list[list[SendResult]] = []
    failures: list[str] = []
    barrier = threading.Barrier(N_ASSOCIATIONS)
    with running_receiver(settings, session_factory) as receiver:

        def pynetdicom_peer(index: int) -> None:
            barrier.wait()
            results.append(send(receiver, series[index], calling_ae=f"PEER{index:02d}"))

        def dcmtk_peer(index: int) -> None:
            barrier.wait()
            proc = run_dcmtk(
                [storescu, "-aet", f"DCMTK{index:02d}", "-aec", "TRIAGED", "127.0.0.1", str(receiver.port)]
                + [str(p) for p in series[index]]
            )
            if proc.returncode != 0:
                failures.append(proc.stderr)

        # Every fifth peer is dcmtk's storescu, the rest pynetdicom: all 25 associations overlap.
        threads = [
            threading.Thread(target=dcmtk_peer if i % 5 == 0 else pynetdicom_peer, args=(i,))
            for i in range(N_ASSOCIATIONS)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not failures, failures
        assert all(r.status == 0 for batch in results for r in batch)

        def all_closed() -> bool:
            with session_factory() as session:
                rows = list(session.scalars(select(Association)))
                return len(rows) == N_ASSOCIATIONS and all(a.closed_at is not None for a in rows)

        wait_for(all_closed)
    rows = instance_rows(session_factory)
    assert len(rows) == N_ASSOCIATIONS * PER_ASSOCIATION
    for row in rows:
        assert hashlib.sha256((settings.storage_dir / row.file_path).read_bytes()).hexdigest() == row.sha256
    with session_factory() as session:
        all_series = list(session.scalars(select(Series)))
    assert len(all_series) == N_ASSOCIATIONS
    assert all(s.instance_count == PER_ASSOCIATION for s in all_series)


@pytest.mark.parametrize("peers", [6])
def test_concurrent_associations_sending_the_same_series(tmp_path, make_settings, session_factory, peers):
    """Racing first inserts of one study/series (and re-sends) give one series, one row per instance."""
    settings = receiver_settings(make_settings, dicom={"max_associations": 32})
    paths = synthetic_series(tmp_path / "s", 6, seed=7)
    barrier = threading.Barrier(peers)
    results: list[SendResult] = []
    with running_receiver(settings, session_factory) as receiver:

        def peer(index: int) -> None:
            barrier.wait()
            results.extend(send(receiver, paths[index % 2 :] + paths[: index % 2], calling_ae=f"P{index}"))

        threads = [threading.Thread(target=peer, args=(i,)) for i in range(peers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert len(results) == peers * len(paths)
    assert all(r.status == 0 for r in results)
    assert len(instance_rows(session_factory)) == len(paths)
    with session_factory() as session:
        (series,) = session.scalars(select(Series))
    assert series.instance_count == len(paths)
