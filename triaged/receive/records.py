"""Rows for one received instance: study, series, instance and series↔association link, in one transaction.

SQLAlchemy Core on a plain connection (no ORM session: its bookkeeping cost more CPU than the statements)
keeps the per-instance transaction small and fast; statements are built once; inserts that can race between
associations (same study or series arriving on two at once) use ``INSERT … ON CONFLICT DO NOTHING``
followed by a read, which is correct on SQLite and PostgreSQL alike.
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import Table, bindparam, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection

from triaged.db.models import Instance, Series, SeriesAssociation, SeriesState, Study

STUDIES: Table = Study.__table__  # type: ignore[assignment]
SERIES: Table = Series.__table__  # type: ignore[assignment]
INSTANCES: Table = Instance.__table__  # type: ignore[assignment]
SERIES_ASSOCIATIONS: Table = SeriesAssociation.__table__  # type: ignore[assignment]

OutcomeKind = Literal["new", "duplicate", "replaced"]

# Built once: SQLAlchemy memoises each statement's cache key, so re-executing costs no re-compilation.
_SELECT_STUDY = select(STUDIES.c.id).where(STUDIES.c.study_instance_uid == bindparam("uid"))
_SELECT_SERIES = (
    select(SERIES.c.id, SERIES.c.state, SERIES.c.generation, SERIES.c.modality)
    .where(SERIES.c.series_instance_uid == bindparam("uid"))
    .with_for_update()
)
_SELECT_INSTANCE = select(INSTANCES.c.id, INSTANCES.c.sha256).where(INSTANCES.c.sop_instance_uid == bindparam("uid"))
_INSERT_INSTANCE = INSTANCES.insert()
_UPDATE_INSTANCE = update(INSTANCES).where(INSTANCES.c.id == bindparam("instance_id"))
# The common case (a new instance of a series still receiving) in one prebuilt statement.
_TOUCH_SERIES_FOR_NEW_INSTANCE = (
    update(SERIES)
    .where(SERIES.c.id == bindparam("b_series_id"))
    .values(
        last_received_at=bindparam("b_now"),
        updated_at=bindparam("b_now"),
        calling_ae_title=bindparam("b_calling_ae_title"),
        instance_count=SERIES.c.instance_count + 1,
    )
)
_INSERT_LINK = {
    "postgresql": pg_insert(SERIES_ASSOCIATIONS).on_conflict_do_nothing(),
    "sqlite": sqlite_insert(SERIES_ASSOCIATIONS).on_conflict_do_nothing(),
}


@dataclass(frozen=True)
class InstanceFacts:
    """The identifying attributes parsed from a received dataset (validated UIDs)."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str
    instance_number: int | None
    transfer_syntax_uid: str


@dataclass(frozen=True)
class RecordOutcome:
    kind: OutcomeKind
    series_id: int
    generation: int
    reopened: bool


def insert_ignore(connection: Connection, table: Table, values: dict[str, Any]) -> None:
    """``INSERT … ON CONFLICT DO NOTHING`` for the connection's dialect."""
    insert = pg_insert if connection.dialect.name == "postgresql" else sqlite_insert
    connection.execute(insert(table).values(**values).on_conflict_do_nothing())


def _study_id(connection: Connection, uid: str, now: datetime) -> int:
    study_id = connection.scalar(_SELECT_STUDY, {"uid": uid})
    if study_id is None:
        insert_ignore(connection, STUDIES, {"study_instance_uid": uid, "created_at": now})
        study_id = connection.scalar(_SELECT_STUDY, {"uid": uid})
    assert study_id is not None
    return int(study_id)


def _series_row(connection: Connection, facts: InstanceFacts, calling_ae_title: str, now: datetime) -> Any:
    params = {"uid": facts.series_instance_uid}
    row = connection.execute(_SELECT_SERIES, params).one_or_none()
    if row is None:
        insert_ignore(
            connection,
            SERIES,
            {
                "series_instance_uid": facts.series_instance_uid,
                "study_id": _study_id(connection, facts.study_instance_uid, now),
                "modality": facts.modality,
                "state": SeriesState.RECEIVING,
                "generation": 1,
                "instance_count": 0,
                "calling_ae_title": calling_ae_title,
                "first_received_at": now,
                "last_received_at": now,
                "updated_at": now,
            },
        )
        row = connection.execute(_SELECT_SERIES, params).one()
    return row


def record_instance(
    connection: Connection,
    facts: InstanceFacts,
    *,
    file_path: str,
    size_bytes: int,
    sha256: str,
    calling_ae_title: str,
    association_id: int | None,
    now: datetime,
    linked: Container[tuple[int, int]] = (),
) -> RecordOutcome:
    """Insert or update the rows for one stored file, in the caller's transaction.

    Same SOP Instance UID with the same sha256: nothing new (``duplicate``). Different sha256: the newest
    wins (``replaced``). A new or replaced instance on a series that was already complete (or later)
    re-opens it with generation + 1, so it is processed again. ``linked`` holds (series id, association id)
    pairs known to be committed already, whose link insert can be skipped.
    """
    series = _series_row(connection, facts, calling_ae_title, now)
    existing = connection.execute(_SELECT_INSTANCE, {"uid": facts.sop_instance_uid}).one_or_none()
    kind: OutcomeKind
    if existing is None:
        kind = "new"
    elif existing.sha256 == sha256:
        kind = "duplicate"
    else:
        kind = "replaced"
    receiving = SeriesState(series.state) == SeriesState.RECEIVING
    generation = int(series.generation)
    reopened = False
    needs_modality = not series.modality and bool(facts.modality)
    if kind == "new" and receiving and not needs_modality:
        connection.execute(
            _TOUCH_SERIES_FOR_NEW_INSTANCE,
            {"b_series_id": series.id, "b_now": now, "b_calling_ae_title": calling_ae_title},
        )
    else:
        series_values: dict[str, Any] = {}
        if kind != "duplicate":
            if not receiving:
                generation += 1
                reopened = True
                series_values |= {
                    "state": SeriesState.RECEIVING,
                    "generation": generation,
                    "completed_at": None,
                    "skip_reason": None,
                }
            series_values |= {"last_received_at": now, "updated_at": now, "calling_ae_title": calling_ae_title}
            if kind == "new":
                series_values["instance_count"] = SERIES.c.instance_count + 1
            if needs_modality:
                series_values["modality"] = facts.modality
        elif receiving:
            series_values |= {"last_received_at": now, "updated_at": now}
        if series_values:
            connection.execute(update(SERIES).where(SERIES.c.id == series.id).values(**series_values))
    instance_values = {
        "series_id": series.id,
        "sop_class_uid": facts.sop_class_uid,
        "transfer_syntax_uid": facts.transfer_syntax_uid,
        "instance_number": facts.instance_number,
        "file_path": file_path,
        "size_bytes": size_bytes,
        "sha256": sha256,
        "generation": generation,
        "association_id": association_id,
        "received_at": now,
        "purged_at": None,
    }
    if kind == "new":
        connection.execute(_INSERT_INSTANCE, [{"sop_instance_uid": facts.sop_instance_uid, **instance_values}])
    elif existing is not None:
        connection.execute(_UPDATE_INSTANCE, [{"instance_id": existing.id, **instance_values}])
    link = (int(series.id), association_id) if association_id is not None else None
    if link is not None and link not in linked and (kind != "duplicate" or receiving):
        dialect = connection.dialect.name
        connection.execute(_INSERT_LINK[dialect], [{"series_id": series.id, "association_id": association_id}])
    return RecordOutcome(kind=kind, series_id=int(series.id), generation=generation, reopened=reopened)
