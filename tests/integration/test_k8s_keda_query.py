"""The query KEDA scales workers on (deploy/k8s, worker-autoscaling.yaml) runs on the real migrated schema.

The manifest holds SQL against the ``jobs`` table: a renamed column or state would make KEDA's scaler fail in the
cluster while every schema check still passes, so the rendered query is run on PostgreSQL here and must count
exactly the infer jobs that need a worker now.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import text

from tests.support.k8s import OVERLAYS, find, render_overlay
from triaged.db import queue
from triaged.db.engine import make_engine, make_session_factory
from triaged.db.models import JobKind, utcnow
from triaged.db.schema import upgrade

pytestmark = pytest.mark.postgres


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_keda_query_counts_infer_jobs_that_need_a_worker(postgres_url: str, overlay: str) -> None:
    (trigger,) = find(render_overlay(overlay), "ScaledObject", "triaged-worker")["spec"]["triggers"]
    sql = trigger["metadata"]["query"]
    engine = make_engine(postgres_url)
    try:
        upgrade(engine)
        factory = make_session_factory(engine)
        with engine.connect() as connection:
            assert connection.execute(text(sql)).scalar_one() == 0
        now = utcnow()
        with factory.begin() as session:
            for key in ("a", "b", "c"):
                queue.enqueue(session, JobKind.INFER, dedupe_key=f"infer:{key}")
            queue.enqueue(session, JobKind.INFER, dedupe_key="infer:backoff", run_after=now + timedelta(hours=1))
            queue.enqueue(session, JobKind.EXPORT, dedupe_key="export:x")
        running = queue.claim(factory, worker_id="w1", kinds=[JobKind.INFER], lease_seconds=60)
        done = queue.claim(factory, worker_id="w2", kinds=[JobKind.INFER], lease_seconds=60)
        assert running is not None and done is not None
        with factory.begin() as session:
            queue.complete(session, done.id, "w2")
        with engine.connect() as connection:
            # one running + one queued now; not the finished one, the one in backoff, or the export
            assert connection.execute(text(sql)).scalar_one() == 2
    finally:
        engine.dispose()
