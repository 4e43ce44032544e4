"""Group commit: rows from many threads commit together; one bad row never fails its neighbours."""

from __future__ import annotations

import sqlite3
import threading
from datetime import UTC, datetime

import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from triaged.db.models import Association, Instance, Series
from triaged.receive.committer import GroupCommitter, PendingRecord
from triaged.receive.records import InstanceFacts, RecordOutcome


def _facts(i: int, series: str = "1.2.3.4") -> InstanceFacts:
    return InstanceFacts(
        sop_instance_uid=f"1.2.3.4.{i}",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
        study_instance_uid="1.2.3",
        series_instance_uid=series,
        modality="MR",
        instance_number=i,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
    )


def test_concurrent_records_commit_and_a_bad_one_fails_alone(session_factory):
    now = datetime.now(UTC)
    with session_factory.begin() as session:
        association = Association(calling_ae_title="A", receiver_id="r", opened_at=now)
        session.add(association)
        session.flush()
        association_id = association.id
    committer = GroupCommitter(session_factory, max_batch=8)
    committer.start()
    outcomes: dict[int, RecordOutcome | BaseException] = {}
    barrier = threading.Barrier(20)

    def record(i: int) -> None:
        barrier.wait()
        try:
            outcomes[i] = committer.submit(
                _facts(i),
                file_path=f"aa/{i}.dcm",
                size_bytes=10,
                sha256=f"{i:064x}",
                calling_ae_title="A",
                association_id=999_999 if i == 7 else association_id,  # 7 violates the foreign key
                now=now,
            ).file_durable()
        except IntegrityError as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=record, args=(i,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    committer.stop()
    assert isinstance(outcomes.pop(7), IntegrityError)
    assert all(isinstance(o, RecordOutcome) and o.kind == "new" for o in outcomes.values())
    with session_factory() as session:
        rows = session.scalars(select(Instance)).all()
        assert sorted(r.instance_number or 0 for r in rows) == [i for i in range(20) if i != 7]
        (series,) = session.scalars(select(Series)).all()
        assert series.instance_count == 19


def test_unstarted_committer_commits_on_the_callers_thread(session_factory):
    committer = GroupCommitter(session_factory)
    now = datetime.now(UTC)
    first = committer.submit(
        _facts(1), file_path="a/1", size_bytes=1, sha256="0" * 64, calling_ae_title="", association_id=None, now=now
    ).file_durable()
    again = committer.submit(
        _facts(1), file_path="a/1", size_bytes=1, sha256="0" * 64, calling_ae_title="", association_id=None, now=now
    ).file_durable()
    changed = committer.submit(
        _facts(1), file_path="a/2", size_bytes=1, sha256="1" * 64, calling_ae_title="", association_id=None, now=now
    ).file_durable()
    assert (first.kind, again.kind, changed.kind) == ("new", "duplicate", "replaced")
    with pytest.raises(IntegrityError):
        committer.submit(
            _facts(2), file_path="a/3", size_bytes=1, sha256="2" * 64, calling_ae_title="", association_id=5, now=now
        ).file_durable()


def _submit(committer: GroupCommitter, i: int, now: datetime) -> PendingRecord:
    return committer.submit(
        _facts(i),
        file_path=f"b/{i}",
        size_bytes=1,
        sha256=f"{i:064x}",
        calling_ae_title="",
        association_id=None,
        now=now,
    )


def _instance_numbers(session_factory) -> list[int]:
    """Committed rows, read without waiting for the write lock the committer may hold (SQLite: plain reader)."""
    engine = session_factory.kw["bind"]
    if engine.dialect.name == "sqlite":
        with sqlite3.connect(engine.url.database) as conn:
            return sorted(n or 0 for (n,) in conn.execute("SELECT instance_number FROM instances"))
    with session_factory() as session:
        return sorted(n or 0 for n in session.scalars(select(Instance.instance_number)).all())


def test_pipelined_rows_commit_only_after_the_file_is_durable_and_withdrawn_ones_never(session_factory):
    """The design's order: file durable, then row committed. The committer may prepare a batch early,
    but nothing of it is visible until every file in it is settled; a withdrawn file's row never appears.

    Synchronised on the committer's own ``wait_prepared`` event, never on time: ``first`` holds the committer
    at its COMMIT step while ``kept`` and ``dropped`` queue, so those two always form the next batch together,
    and both are prepared before ``dropped`` is withdrawn. A committer that did not wait for the files would
    commit ``dropped`` too, whatever the machine's speed.
    """
    committer = GroupCommitter(session_factory)
    committer.start()
    now = datetime.now(UTC)
    try:
        first = _submit(committer, 1, now)
        assert first.wait_prepared(timeout=30), "the committer never prepared the first batch"
        kept, dropped = _submit(committer, 2, now), _submit(committer, 3, now)
        assert _instance_numbers(session_factory) == []
        assert first.file_durable().kind == "new"
        assert _instance_numbers(session_factory) == [1]
        assert kept.wait_prepared(timeout=30) and dropped.wait_prepared(timeout=30), "second batch never prepared"
        assert _instance_numbers(session_factory) == [1]
        dropped.withdraw()
        assert kept.file_durable().kind == "new"
        assert _instance_numbers(session_factory) == [1, 2]
        late = _submit(committer, 4, now)
        assert late.file_durable().kind == "new"
        assert _instance_numbers(session_factory) == [1, 2, 4]
    finally:
        committer.stop()
