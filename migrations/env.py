"""Alembic environment: runs on a connection handed over by triaged.db.schema, or on the configured URL."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from triaged.db.engine import make_engine
from triaged.db.models import Base

config = context.config
target_metadata = Base.metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(config.get_main_option("sqlalchemy.url") or "")
    with engine.connect() as new_connection:
        _run(new_connection)
        new_connection.commit()


if context.is_offline_mode():
    raise SystemExit("offline migrations are not supported; run `triaged db upgrade`")
run_migrations_online()
