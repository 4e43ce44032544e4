"""Alembic is the only schema author: head must equal the models, on SQLite and PostgreSQL (style P13)."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect

from triaged.db.engine import make_engine
from triaged.db.models import Base
from triaged.db.schema import current_revision, downgrade, head_revision, require_current_schema, upgrade
from triaged.errors import SchemaOutdatedError


def test_head_matches_models(engine: Engine) -> None:
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}), Base.metadata)
    assert diff == []
    assert set(inspect(engine).get_table_names()) >= {
        "studies",
        "series",
        "instances",
        "jobs",
        "results",
        "outputs",
    }
    require_current_schema(engine)


def test_refuses_empty_schema_and_names_the_fix(db_url: str) -> None:
    engine = make_engine(db_url)
    with pytest.raises(SchemaOutdatedError, match="triaged db upgrade"):
        require_current_schema(engine)
    upgrade(engine)
    upgrade(engine)  # idempotent
    require_current_schema(engine)
    engine.dispose()


def _schema_diff(engine: Engine) -> list[object]:
    with engine.connect() as connection:
        return list(
            compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}), Base.metadata)
        )


def test_upgrade_downgrade_upgrade_round_trip(db_url: str) -> None:
    """Every migration's downgrade runs and undoes it completely: upgrade → downgrade → upgrade ends where
    the first upgrade did (nothing left behind that a second upgrade trips over, on either database)."""
    engine = make_engine(db_url)
    try:
        upgrade(engine)
        assert _schema_diff(engine) == []
        with engine.begin() as connection:  # a row, which the downgrade must drop with its table
            connection.exec_driver_sql(
                "INSERT INTO jobs (kind, state, priority, dedupe_key, payload, attempts, max_attempts, run_after, "
                "created_at, updated_at) VALUES ('infer', 'queued', 0, 'k', '{}', 0, 5, "
                "CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
            )
        steps = 0
        while current_revision(engine) is not None:  # one revision at a time: every downgrade() runs
            downgrade(engine, "-1")
            steps += 1
        assert steps >= 1
        left = set(inspect(engine).get_table_names()) - {"alembic_version"}
        assert left == set(), f"downgrade left tables behind: {sorted(left)}"
        with pytest.raises(SchemaOutdatedError, match="schema is empty"):
            require_current_schema(engine)
        upgrade(engine)
        assert current_revision(engine) == head_revision(db_url)
        assert _schema_diff(engine) == []
        require_current_schema(engine)
        with engine.connect() as connection:  # the old rows went with the old tables
            assert connection.exec_driver_sql("SELECT count(*) FROM jobs").scalar() == 0
    finally:
        engine.dispose()


def test_sqlite_pragmas_are_durable(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    with engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    engine.dispose()


def test_daemon_refuses_the_schema_before_destinations_and_upgrade_downgrade_round_trips(db_url: str) -> None:
    engine = make_engine(db_url)
    upgrade(engine, "0001")
    with pytest.raises(SchemaOutdatedError, match=r"at revision 0001.*triaged db upgrade"):
        require_current_schema(engine)
    upgrade(engine)
    assert "destinations" in inspect(engine).get_table_names()
    assert "destination" in {c["name"] for c in inspect(engine).get_columns("jobs")}
    downgrade(engine, "0001")
    assert "destinations" not in inspect(engine).get_table_names()
    assert "destination" not in {c["name"] for c in inspect(engine).get_columns("jobs")}
    upgrade(engine)
    require_current_schema(engine)
    engine.dispose()


def test_receivers_revision_gives_open_associations_a_heartbeat_and_round_trips(db_url: str) -> None:
    """0006 adds `receivers`; an association left open before it gets a row for its receiver id, beating from
    the upgrade, so the reaper can close it once the time-out has passed (and a returning receiver still can)."""
    engine = make_engine(db_url)
    try:
        upgrade(engine, "0005")
        with engine.begin() as connection:
            for receiver_id, closed in (("old-host:TRIAGED:11112", None), ("done:TRIAGED:1", "CURRENT_TIMESTAMP")):
                connection.exec_driver_sql(
                    "INSERT INTO associations (calling_ae_title, peer_address, receiver_id, opened_at, closed_at) "
                    f"VALUES ('PACS', '', '{receiver_id}', CURRENT_TIMESTAMP, {closed or 'NULL'})"
                )
        upgrade(engine, "0006")
        with engine.connect() as connection:
            rows = connection.exec_driver_sql("SELECT id, host, heartbeat_at FROM receivers").all()
        assert [(r.id, r.host) for r in rows] == [("old-host:TRIAGED:11112", "old-host")]
        assert rows[0].heartbeat_at is not None
        downgrade(engine, "0005")
        assert "receivers" not in inspect(engine).get_table_names()
        upgrade(engine)
        require_current_schema(engine)
        assert _schema_diff(engine) == []
    finally:
        engine.dispose()
