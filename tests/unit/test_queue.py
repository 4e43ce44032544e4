"""Queue state machine on a real SQLite file and the real PostgreSQL server (db_url fixture)."""

from __future__ import annotations

import random
from datetime import timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from triaged.db import queue
from triaged.db.models import Job, JobKind, JobState, utcnow
from triaged.errors import InferenceError, PixelDecodeError


def _add(factory: sessionmaker[Session], key: str, **kwargs: object) -> int:
    with factory.begin() as session:
        job = queue.enqueue(session, kwargs.pop("kind", JobKind.INFER), dedupe_key=key, **kwargs)  # type: ignore[arg-type]
        assert job is not None
        return job.id


def _job(factory: sessionmaker[Session], job_id: int) -> Job:
    with factory() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def test_claim_order_priority_then_oldest(session_factory: sessionmaker[Session]) -> None:
    now = utcnow()
    old = _add(session_factory, "a", run_after=now - timedelta(seconds=30))
    new = _add(session_factory, "b", run_after=now - timedelta(seconds=10))
    urgent = _add(session_factory, "c", priority=5, run_after=now - timedelta(seconds=1))
    _add(session_factory, "future", run_after=now + timedelta(hours=1))
    _add(session_factory, "export", kind=JobKind.EXPORT)
    order = []
    for _ in range(4):
        job = queue.claim(session_factory, worker_id="w1", kinds=[JobKind.INFER], lease_seconds=60)
        if job is None:
            break
        order.append(job.id)
        assert job.state == JobState.RUNNING
        assert job.lease_owner == "w1"
        assert job.attempts == 1
        assert job.lease_expires_at is not None and job.lease_expires_at > now
    assert order == [urgent, old, new]
    export = queue.claim(session_factory, worker_id="w1", kinds=[JobKind.EXPORT], lease_seconds=60)
    assert export is not None and export.kind == JobKind.EXPORT


def test_dedupe_index_allows_one_active_job(session_factory: sessionmaker[Session]) -> None:
    first = _add(session_factory, "infer:1:1")
    with session_factory.begin() as session:
        assert queue.enqueue(session, JobKind.INFER, dedupe_key="infer:1:1") is None
    with pytest.raises(IntegrityError), session_factory.begin() as session:
        session.add(Job(kind=JobKind.INFER, dedupe_key="infer:1:1", payload={}))
        session.flush()
    job = queue.claim(session_factory, worker_id="w", kinds=[JobKind.INFER], lease_seconds=60)
    assert job is not None and job.id == first
    with session_factory.begin() as session:
        queue.complete(session, first, "w")
    # a finished job no longer blocks a new one with the same key
    _add(session_factory, "infer:1:1")


def test_complete_commits_with_caller_and_rolls_back_on_lost_lease(session_factory: sessionmaker[Session]) -> None:
    job_id = _add(session_factory, "k")
    job = queue.claim(session_factory, worker_id="w1", kinds=[JobKind.INFER], lease_seconds=60)
    assert job is not None
    # another worker's completion attempt is refused and its transaction rolls back
    with pytest.raises(queue.LeaseLostError), session_factory.begin() as session:
        session.add(Job(kind=JobKind.EXPORT, dedupe_key="side-effect", payload={}))
        queue.complete(session, job_id, "w2")
    with session_factory() as session:
        assert session.scalar(select(Job).where(Job.dedupe_key == "side-effect")) is None
    with session_factory.begin() as session:
        session.add(Job(kind=JobKind.EXPORT, dedupe_key="result-of-w1", payload={}))
        queue.complete(session, job_id, "w1")
    done = _job(session_factory, job_id)
    assert done.state == JobState.DONE and done.finished_at is not None
    with session_factory() as session:
        assert session.scalar(select(Job).where(Job.dedupe_key == "result-of-w1")) is not None


def test_heartbeat_extends_and_detects_loss(session_factory: sessionmaker[Session]) -> None:
    job_id = _add(session_factory, "k")
    job = queue.claim(session_factory, worker_id="w1", kinds=[JobKind.INFER], lease_seconds=1)
    assert job is not None and job.lease_expires_at is not None
    assert queue.heartbeat(session_factory, job_id, "w1", 600)
    assert _job(session_factory, job_id).lease_expires_at > job.lease_expires_at + timedelta(seconds=500)  # type: ignore[operator]
    assert not queue.heartbeat(session_factory, job_id, "w2", 600)


def test_fail_permanent_retryable_and_dead(session_factory: sessionmaker[Session]) -> None:
    rng = random.Random(1)
    perm = _add(session_factory, "perm")
    assert queue.claim(session_factory, worker_id="w", kinds=[JobKind.INFER], lease_seconds=60) is not None
    state = queue.fail(session_factory, perm, "w", PixelDecodeError("colour image\nnot supported"))
    assert state == JobState.FAILED
    job = _job(session_factory, perm)
    assert job.last_error == "PixelDecodeError: colour image not supported"
    assert job.finished_at is not None

    retry = _add(session_factory, "retry", max_attempts=2)
    now = utcnow()
    assert queue.claim(session_factory, worker_id="w", kinds=[JobKind.INFER], lease_seconds=60, now=now) is not None
    state = queue.fail(session_factory, retry, "w", InferenceError("oom"), backoff_base_seconds=10, now=now, rng=rng)
    assert state == JobState.QUEUED
    job = _job(session_factory, retry)
    assert job.lease_owner is None and job.attempts == 1
    assert now <= job.run_after <= now + timedelta(seconds=10)
    # not runnable before run_after
    assert queue.claim(session_factory, worker_id="w", kinds=[JobKind.INFER], lease_seconds=60, now=now) is None
    later = now + timedelta(seconds=11)
    again = queue.claim(session_factory, worker_id="w", kinds=[JobKind.INFER], lease_seconds=60, now=later)
    assert again is not None and again.attempts == 2
    # unknown exceptions count as retryable; attempts exhausted -> dead
    assert queue.fail(session_factory, retry, "w", RuntimeError("boom"), now=later) == JobState.DEAD
    assert _job(session_factory, retry).last_error == "RuntimeError: boom"
    with pytest.raises(queue.LeaseLostError):
        queue.fail(session_factory, retry, "w", RuntimeError("again"))


def test_backoff_is_bounded_full_jitter() -> None:
    rng = random.Random(0)
    values = [queue.backoff_seconds(n, 5.0, 60.0, rng) for n in range(1, 12) for _ in range(20)]
    assert min(values) >= 0.0
    assert max(values) <= 60.0
    assert max(queue.backoff_seconds(1, 5.0, 60.0, rng) for _ in range(50)) <= 5.0


def test_reaper_requeues_expired_and_kills_exhausted(session_factory: sessionmaker[Session]) -> None:
    live = _add(session_factory, "live")
    crashed = _add(session_factory, "crashed")
    exhausted = _add(session_factory, "exhausted", max_attempts=1)
    now = utcnow()
    claimed = [
        queue.claim(session_factory, worker_id=w, kinds=[JobKind.INFER], lease_seconds=s, now=now)
        for w, s in (("w-live", 600), ("w-dead", 5), ("w-dead", 5))
    ]
    assert [j.id for j in claimed if j] == [live, crashed, exhausted]
    assert queue.reap_expired_leases(session_factory, now=now + timedelta(seconds=1)) == 0
    assert queue.reap_expired_leases(session_factory, now=now + timedelta(seconds=10), batch_size=1) == 2
    assert _job(session_factory, live).state == JobState.RUNNING
    requeued = _job(session_factory, crashed)
    assert requeued.state == JobState.QUEUED and requeued.lease_owner is None
    assert requeued.last_error == "LeaseExpiredError: lease of w-dead expired"
    assert _job(session_factory, exhausted).state == JobState.DEAD
    # the dead worker's late completion is refused
    with pytest.raises(queue.LeaseLostError), session_factory.begin() as session:
        queue.complete(session, crashed, "w-dead")
    other = queue.claim(
        session_factory, worker_id="w2", kinds=[JobKind.INFER], lease_seconds=60, now=now + timedelta(seconds=11)
    )
    assert other is not None and other.id == crashed and other.attempts == 2


def test_requeue_dead_jobs_skips_active_twins(session_factory: sessionmaker[Session]) -> None:
    dead = _add(session_factory, "x", max_attempts=1)
    assert queue.claim(session_factory, worker_id="w", kinds=[JobKind.INFER], lease_seconds=60) is not None
    assert queue.fail(session_factory, dead, "w", RuntimeError("net")) == JobState.DEAD
    with session_factory.begin() as session:
        assert queue.requeue(session, [dead]) == [dead]
    job = _job(session_factory, dead)
    assert job.state == JobState.QUEUED and job.attempts == 0
    assert queue.claim(session_factory, worker_id="w", kinds=[JobKind.INFER], lease_seconds=60) is not None
    assert queue.fail(session_factory, dead, "w", RuntimeError("net")) == JobState.DEAD
    _add(session_factory, "x")  # an active twin appeared meanwhile
    with session_factory.begin() as session:
        assert queue.requeue(session, [dead]) == []


def test_release_gives_job_back_without_counting(session_factory: sessionmaker[Session]) -> None:
    job_id = _add(session_factory, "r")
    assert queue.claim(session_factory, worker_id="w", kinds=[JobKind.INFER], lease_seconds=60) is not None
    assert queue.release(session_factory, job_id, "w")
    job = _job(session_factory, job_id)
    assert job.state == JobState.QUEUED and job.attempts == 0
    assert queue.counts_by_state(session_factory) == {("infer", "queued"): 1}


def test_concurrent_claims_never_share_a_job(session_factory: sessionmaker[Session]) -> None:
    import threading

    ids = [_add(session_factory, f"c{i}") for i in range(20)]
    got: list[int] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        while True:
            job = queue.claim(session_factory, worker_id=name, kinds=[JobKind.INFER], lease_seconds=60)
            if job is None:
                return
            with lock:
                got.append(job.id)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(got) == ids


def test_reaper_is_bounded_per_call_and_catches_up(session_factory: sessionmaker[Session]) -> None:
    now = utcnow()
    with session_factory.begin() as session:
        session.add_all(
            Job(
                kind=JobKind.INFER,
                state=JobState.RUNNING,
                dedupe_key=f"bulk{i}",
                payload={},
                attempts=1,
                lease_owner="gone",
                lease_expires_at=now - timedelta(seconds=1),
            )
            for i in range(25)
        )
    # 10 batches of 2 at most per call: short transactions, never an unbounded sweep
    assert queue.reap_expired_leases(session_factory, now=now, batch_size=2) == 20
    assert queue.reap_expired_leases(session_factory, now=now, batch_size=2) == 5
    assert queue.counts_by_state(session_factory) == {("infer", "queued"): 25}
