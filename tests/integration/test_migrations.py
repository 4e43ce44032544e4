"""Alembic is the only schema author: head must equal the models, on SQLite and PostgreSQL (style P13)."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect

from triaged.db.engine import make_engine
from triaged.db.models import Base
from triaged.db.schema import require_current_schema, upgrade
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


def test_sqlite_pragmas_are_durable(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    with engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    engine.dispose()
