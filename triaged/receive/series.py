"""Series completion from database facts (design: Series completion; style P6).

A series in state ``receiving`` is complete when every association that delivered to it has closed AND
nothing arrived for the quiet period (``series.quiet_seconds``, per-peer override by the series' last
calling AE). The sweep marks it complete and, in the same transaction, enqueues one ``infer`` job for
its generation, or records it as ``skipped`` with a reason. A conditional UPDATE makes each series fire
exactly once per generation even with several sweeps running against one database.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import ColumnElement, Table, and_, exists, select, update
from sqlalchemy.orm import Session, sessionmaker

from triaged import metrics
from triaged.config import Settings
from triaged.db.models import Association, Instance, JobKind, Series, SeriesAssociation, SeriesState
from triaged.db.queue import enqueue
from triaged.dicom.contexts import MR_IMAGE_SOP_CLASSES
from triaged.log import uid_hash

log = structlog.get_logger()

SERIES: Table = Series.__table__  # type: ignore[assignment]
LINKS: Table = SeriesAssociation.__table__  # type: ignore[assignment]
ASSOCIATIONS: Table = Association.__table__  # type: ignore[assignment]
INSTANCES: Table = Instance.__table__  # type: ignore[assignment]


def _no_open_association() -> ColumnElement[bool]:
    return ~exists().where(
        and_(
            LINKS.c.series_id == SERIES.c.id,
            LINKS.c.association_id == ASSOCIATIONS.c.id,
            ASSOCIATIONS.c.closed_at.is_(None),
        )
    )


def skip_reason(session: Session, series_id: int, modality: str) -> str | None:
    """Why a complete series will not be assessed, or None when it goes to inference."""
    if modality != "MR":
        return f"modality {modality or '(missing)'} is not MR"
    sop_classes = set(session.scalars(select(INSTANCES.c.sop_class_uid).where(INSTANCES.c.series_id == series_id)))
    if not sop_classes & set(MR_IMAGE_SOP_CLASSES):
        listed = ", ".join(sorted(sop_classes)) or "(none)"
        return f"no MR image storage instances (SOP classes: {listed})"
    return None


def _quiet_by_ae(settings: Settings) -> dict[str, float]:
    return {
        peer.ae_title: peer.quiet_seconds for peer in settings.dicom.peers.values() if peer.quiet_seconds is not None
    }


def sweep_complete_series(
    session_factory: sessionmaker[Session], settings: Settings, *, now: datetime | None = None
) -> list[int]:
    """Complete every quiet, fully received series; return their ids (each fires once per generation)."""
    now = now or datetime.now(UTC)
    default_quiet = settings.series.quiet_seconds
    quiet_by_ae = _quiet_by_ae(settings)
    earliest = now - timedelta(seconds=min([default_quiet, *quiet_by_ae.values()]))
    fired: list[tuple[int, str, int, str | None]] = []
    with session_factory.begin() as session:
        candidates = session.execute(
            select(
                SERIES.c.id,
                SERIES.c.series_instance_uid,
                SERIES.c.generation,
                SERIES.c.calling_ae_title,
                SERIES.c.last_received_at,
                SERIES.c.modality,
            )
            .where(SERIES.c.state == SeriesState.RECEIVING, SERIES.c.last_received_at <= earliest)
            .where(_no_open_association())
            .order_by(SERIES.c.last_received_at)
        ).all()
        for row in candidates:
            quiet_until = now - timedelta(seconds=quiet_by_ae.get(row.calling_ae_title, default_quiet))
            if row.last_received_at > quiet_until:
                continue
            outcome = _complete_one(session, settings, row, quiet_until, now)
            if outcome is not None:
                fired.append((row.id, row.series_instance_uid, row.generation, outcome))
    for series_id, uid, generation, reason in fired:
        metrics.SERIES_COMPLETED.inc()
        log.info(
            "series_completed",
            series_id=series_id,
            series_instance_uid=uid_hash(uid),
            generation=generation,
            state="skipped" if reason else "queued",
            skip_reason=reason or None,
        )
    return [series_id for series_id, *_ in fired]


def _complete_one(session: Session, settings: Settings, row: Any, quiet_until: datetime, now: datetime) -> str | None:
    """Mark one series complete then queued/skipped; return "" (queued), a skip reason, or None (lost race)."""
    result = session.execute(
        update(SERIES)
        .where(
            SERIES.c.id == row.id,
            SERIES.c.state == SeriesState.RECEIVING,
            SERIES.c.generation == row.generation,
            SERIES.c.last_received_at <= quiet_until,
        )
        .where(_no_open_association())
        .values(state=SeriesState.COMPLETE, completed_at=now, updated_at=now)
    )
    if getattr(result, "rowcount", 0) != 1:
        return None
    reason = skip_reason(session, row.id, row.modality)
    if reason is not None:
        session.execute(
            update(SERIES)
            .where(SERIES.c.id == row.id)
            .values(state=SeriesState.SKIPPED, skip_reason=reason, updated_at=now)
        )
        return reason
    enqueue(
        session,
        JobKind.INFER,
        dedupe_key=f"infer:{row.id}:{row.generation}",
        series_id=row.id,
        generation=row.generation,
        max_attempts=settings.worker.max_attempts,
    )
    session.execute(update(SERIES).where(SERIES.c.id == row.id).values(state=SeriesState.QUEUED, updated_at=now))
    return ""
