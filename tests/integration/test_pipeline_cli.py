"""`jobs list`, `retry`, `reprocess`, `purge` in-process (CliRunner) on real SQLite and PostgreSQL rows."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from tests.support.pipeline_daemon import write_config
from triaged.cli.app import app
from triaged.db import queue
from triaged.db.models import Instance, Job, JobKind, JobState, Result, ResultStatus, Series, SeriesState, Study, utcnow
from triaged.receive.storage import InstanceStore

runner = CliRunner()


@pytest.fixture
def config(tmp_path: Path, db_url: str, session_factory: sessionmaker[Session]) -> Path:
    return write_config(
        tmp_path / "c.toml",
        {
            "data_dir": str(tmp_path / "data"),
            "database": {"url": db_url},
            "storage": {"min_free_bytes": 0},
            "worker": {"max_attempts": 3},
        },
    )


@pytest.fixture
def store(tmp_path: Path) -> InstanceStore:
    return InstanceStore(tmp_path / "data" / "storage", 0)


def _seed(session_factory: sessionmaker[Session], store: InstanceStore) -> dict[str, int]:
    """Two studies: a done series (old files), a failed one, a receiving one; dead and failed jobs."""
    old = utcnow() - timedelta(days=10)
    ids: dict[str, int] = {}
    with session_factory.begin() as session:
        study_a = Study(study_instance_uid="1.2.826.0.1.1")
        study_b = Study(study_instance_uid="1.2.826.0.1.2")
        session.add_all([study_a, study_b])
        session.flush()
        specs = [
            ("done", study_a, SeriesState.DONE, old),
            ("failed", study_a, SeriesState.FAILED, old),
            ("receiving", study_b, SeriesState.RECEIVING, old),
        ]
        for name, study, state, received in specs:
            series = Series(
                series_instance_uid=f"1.2.826.0.1.9.{len(ids) + 1}",
                study_id=study.id,
                modality="MR",
                state=state,
                last_received_at=received,
            )
            session.add(series)
            session.flush()
            relative = f"instances/{name}.dcm"
            store.write_atomic(relative, b"DICM" + name.encode())
            session.add(
                Instance(
                    sop_instance_uid=f"1.2.826.0.1.8.{series.id}",
                    series_id=series.id,
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.4",
                    transfer_syntax_uid="1.2.840.10008.1.2.1",
                    file_path=relative,
                    size_bytes=9,
                    sha256="0" * 64,
                    received_at=received,
                )
            )
            ids[name] = series.id
        session.add(
            Result(
                series_id=ids["done"],
                generation=1,
                model_name="m",
                model_version="1",
                model_sha256="a" * 64,
                status=ResultStatus.ASSESSED,
                label="notumor",
            )
        )
        dead = Job(kind=JobKind.EXPORT, state=JobState.DEAD, dedupe_key="export:1", attempts=10, payload={})
        failed = Job(kind=JobKind.INFER, state=JobState.FAILED, dedupe_key="infer:x", attempts=1, payload={})
        session.add_all([dead, failed])
        session.flush()
        ids["dead_job"], ids["failed_job"] = dead.id, failed.id
    return ids


def _invoke(config: Path, *args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, ["-c", str(config), *args])
    return result.exit_code, result.stdout, result.stderr


def test_jobs_list_and_retry(config: Path, session_factory: sessionmaker[Session], store: InstanceStore) -> None:
    ids = _seed(session_factory, store)
    code, out, _ = _invoke(config, "jobs", "list", "--state", "dead", "--json")
    assert code == 0
    assert [(j["id"], j["kind"], j["state"]) for j in json.loads(out)] == [(ids["dead_job"], "export", "dead")]
    code, out, _ = _invoke(config, "jobs", "list")
    assert code == 0 and out.splitlines()[0].split()[:3] == ["ID", "KIND", "STATE"]
    code, _, err = _invoke(config, "retry", "424242")
    assert code == 1 and err.strip() == "error: unknown job id(s): 424242"
    code, out, _ = _invoke(config, "retry", "--all", "--json")
    assert code == 0 and json.loads(out) == {"requeued": [ids["dead_job"]]}
    code, out, _ = _invoke(config, "retry", str(ids["failed_job"]))
    assert code == 0 and out.strip() == f"re-queued 1 job(s): {ids['failed_job']}"
    with session_factory() as session:
        states = dict(session.execute(select(Job.id, Job.state)).tuples().all())
    assert states == {ids["dead_job"]: JobState.QUEUED, ids["failed_job"]: JobState.QUEUED}


def test_reprocess_selectors(config: Path, session_factory: sessionmaker[Session], store: InstanceStore) -> None:
    ids = _seed(session_factory, store)
    code, _, err = _invoke(config, "reprocess", "9.9.9")
    assert code == 1 and err.strip() == "error: unknown series 9.9.9"
    code, _, err = _invoke(config, "reprocess", "--since", "yesterday")
    assert code == 1 and "not an ISO date/time" in err
    code, _, err = _invoke(config, "reprocess", "--failed", "--model", "/nonexistent")
    assert code == 2 and "is not a model directory" in err
    code, out, _ = _invoke(config, "reprocess", "--failed", "--json")
    assert code == 0
    [queued] = json.loads(out)["queued"]
    assert queued["series_id"] == ids["failed"]
    # the whole study: done + failed (failed already has an active job, so only done is new)
    code, out, _ = _invoke(config, "reprocess", "--study", "1.2.826.0.1.1", "--json")
    assert code == 0
    assert [q["series_id"] for q in json.loads(out)["queued"]] == [ids["done"]]
    # --since in the future selects nothing; the receiving series is never queued
    code, out, _ = _invoke(config, "reprocess", "--since", (utcnow() + timedelta(days=1)).isoformat(), "--json")
    assert code == 0 and json.loads(out)["queued"] == []
    code, out, _ = _invoke(config, "reprocess", "--study", "1.2.826.0.1.2")
    assert code == 0 and "queued 0 series" in out and "still receiving" in out
    with session_factory() as session:
        jobs = session.scalars(select(Job).where(Job.kind == JobKind.INFER, Job.state == JobState.QUEUED)).all()
        assert sorted(j.series_id or 0 for j in jobs) == sorted([ids["failed"], ids["done"]])
        assert {j.priority for j in jobs} == {-10}  # behind newly received series
        assert session.get(Series, ids["failed"]).state == SeriesState.QUEUED  # type: ignore[union-attr]


def test_purge_keeps_results_and_active_series(
    config: Path, session_factory: sessionmaker[Session], store: InstanceStore
) -> None:
    ids = _seed(session_factory, store)
    with session_factory.begin() as session:  # the failed series has an active job: its files stay
        queue.enqueue(session, JobKind.INFER, dedupe_key="infer:f", series_id=ids["failed"])
    code, out, _ = _invoke(config, "purge", "--older-than-days", "30", "--json")
    assert code == 0 and json.loads(out) == {"purged": 0}
    code, out, _ = _invoke(config, "purge", "--older-than-days", "1", "--json")
    assert code == 0 and json.loads(out) == {"purged": 1}
    assert not store.path_for("instances/done.dcm").exists()
    assert store.path_for("instances/failed.dcm").exists()
    assert store.path_for("instances/receiving.dcm").exists()
    with session_factory() as session:
        purged = session.scalar(select(Instance).where(Instance.series_id == ids["done"]))
        assert purged is not None and purged.purged_at is not None
        assert session.scalar(select(Result).where(Result.series_id == ids["done"])) is not None
    # a purged series cannot be reprocessed: skipped with the reason, nothing queued
    code, out, _ = _invoke(config, "reprocess", "1.2.826.0.1.9.1")
    assert code == 0 and "queued 0 series" in out and "purged" in out
