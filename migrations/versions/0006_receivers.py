"""receiver liveness: a `receivers` table with one heartbeat per receiver id

The reaper closes the open associations of a receiver whose heartbeat ran out, so a receiver host that never
comes back no longer holds its series. Associations left open before this revision get a row for their
receiver id with a heartbeat of now: a receiver that comes back closes them as before, and one that does not
is reaped once ``dicom.receiver_timeout_seconds`` has passed.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 14:40:00
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    receivers = op.create_table(
        "receivers",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("stopped_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_receivers")),
    )
    with op.batch_alter_table("receivers", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_receivers_heartbeat_at"), ["heartbeat_at"], unique=False)
    open_ids = op.get_bind().execute(
        sa.text("SELECT DISTINCT receiver_id FROM associations WHERE closed_at IS NULL ORDER BY receiver_id")
    )
    now = datetime.now(UTC)
    rows = [
        {"id": receiver_id, "host": receiver_id.split(":", 1)[0], "started_at": now, "heartbeat_at": now}
        for (receiver_id,) in open_ids
    ]
    if rows and receivers is not None:
        op.bulk_insert(receivers, rows)


def downgrade() -> None:
    with op.batch_alter_table("receivers", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_receivers_heartbeat_at"))
    op.drop_table("receivers")
