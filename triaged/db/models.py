"""SQLAlchemy 2 typed models: the single source of truth for pipeline state (style P6).

Only UIDs and technical metadata are stored; patient and study attributes needed for outputs are read
from the stored source files when outputs are built.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from triaged.db.states import DestinationState as DestinationState  # noqa: PLC0414 (re-exported)
from triaged.db.states import JobKind as JobKind  # noqa: PLC0414 (re-exported)
from triaged.db.states import JobState as JobState  # noqa: PLC0414 (re-exported)
from triaged.db.states import OutputKind as OutputKind  # noqa: PLC0414 (re-exported)
from triaged.db.states import ResultStatus as ResultStatus  # noqa: PLC0414 (re-exported)
from triaged.db.states import SeriesState as SeriesState  # noqa: PLC0414 (re-exported)
from triaged.db.states import UserRole as UserRole  # noqa: PLC0414 (re-exported)

UID = String(64)
AE_TITLE = String(16)

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend; naive datetimes are refused (style P8)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime refused: use timezone-aware UTC")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    return Enum(
        cls,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        values_callable=lambda members: [member.value for member in members],
        validate_strings=True,
    )


ACTIVE_JOB_STATES = (JobState.QUEUED, JobState.RUNNING)
URGENT_EXPORT_PRIORITY = 10  # an urgent finding reaches the PACS before any other queued work


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    series: Mapped[list[Series]] = relationship(back_populates="study")


class Association(Base):
    """One inbound association; series completion waits until every association that sent to it closed."""

    __tablename__ = "associations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    calling_ae_title: Mapped[str] = mapped_column(AE_TITLE)
    peer_address: Mapped[str] = mapped_column(String(64), default="")
    receiver_id: Mapped[str] = mapped_column(String(64))
    opened_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    closed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, index=True)


class Receiver(Base):
    """One receiver process's liveness: series completion waits on its open associations only while it beats.

    The row is keyed by the ``receiver_id`` its associations carry. A receiver writes it at start and every
    ``dicom.heartbeat_seconds``; the reaper closes the open associations of one whose heartbeat is older than
    ``dicom.receiver_timeout_seconds`` (:mod:`triaged.db.receivers`), so a host that never comes back does not
    hold its series forever.
    """

    __tablename__ = "receivers"

    id: Mapped[str] = mapped_column(String(64), primary_key=True, doc="the receiver_id of its associations")
    host: Mapped[str] = mapped_column(String(255), default="")
    pid: Mapped[int | None] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    stopped_at: Mapped[datetime | None] = mapped_column(UTCDateTime, doc="set by a clean stop")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    modality: Mapped[str] = mapped_column(String(16), default="")
    state: Mapped[SeriesState] = mapped_column(_enum(SeriesState, "series_state"), default=SeriesState.RECEIVING)
    skip_reason: Mapped[str | None] = mapped_column(Text)
    generation: Mapped[int] = mapped_column(Integer, default=1)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    calling_ae_title: Mapped[str] = mapped_column(AE_TITLE, default="")
    first_received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")

    __table_args__ = (Index(None, "state", "last_received_at"),)


class SeriesAssociation(Base):
    """Which associations delivered instances of which series (for completion)."""

    __tablename__ = "series_associations"

    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), primary_key=True)
    association_id: Mapped[int] = mapped_column(ForeignKey("associations.id"), primary_key=True, index=True)


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    instance_number: Mapped[int | None] = mapped_column(Integer)
    file_path: Mapped[str] = mapped_column(String(255), doc="relative to the storage directory")
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    generation: Mapped[int] = mapped_column(Integer, default=1)
    association_id: Mapped[int | None] = mapped_column(ForeignKey("associations.id"))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    purged_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    series: Mapped[Series] = relationship(back_populates="instances")


class Job(Base):
    """One unit of queued work; see db/queue.py for the state machine."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[JobKind] = mapped_column(_enum(JobKind, "job_kind"))
    state: Mapped[JobState] = mapped_column(_enum(JobState, "job_state"), default=JobState.QUEUED)
    priority: Mapped[int] = mapped_column(Integer, default=0, doc="higher runs first")
    series_id: Mapped[int | None] = mapped_column(ForeignKey("series.id"), index=True)
    generation: Mapped[int | None] = mapped_column(Integer)
    dedupe_key: Mapped[str] = mapped_column(String(200), doc="at most one active job per key")
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    destination: Mapped[str | None] = mapped_column(
        String(64), doc="export jobs: the destination name, set on the first run; claims skip down destinations"
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=5)
    run_after: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (
        Index(None, "state", "run_after", "priority"),
        Index(
            "uq_jobs_active_dedupe_key",
            "dedupe_key",
            unique=True,
            sqlite_where=text("state IN ('queued', 'running')"),
            postgresql_where=text("state IN ('queued', 'running')"),
        ),
    )


class Result(Base):
    """One processing of one series generation by one model."""

    __tablename__ = "results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"))
    generation: Mapped[int] = mapped_column(Integer)
    model_name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(32))
    model_sha256: Mapped[str] = mapped_column(String(64))
    status: Mapped[ResultStatus] = mapped_column(_enum(ResultStatus, "result_status"))
    reason: Mapped[str | None] = mapped_column(Text)
    label: Mapped[str | None] = mapped_column(String(32))
    probabilities: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)
    urgency: Mapped[float | None] = mapped_column(Float)
    threshold: Mapped[float | None] = mapped_column(Float)
    urgent: Mapped[bool] = mapped_column(Boolean, default=False)
    ood_score: Mapped[float | None] = mapped_column(Float)
    timings: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    slice_predictions: Mapped[list[SlicePrediction]] = relationship(
        back_populates="result", order_by="SlicePrediction.slice_index"
    )
    outputs: Mapped[list[Output]] = relationship(back_populates="result")

    __table_args__ = (UniqueConstraint("series_id", "generation", "model_sha256"),)


class SlicePrediction(Base):
    __tablename__ = "slice_predictions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id"), index=True)
    slice_index: Mapped[int] = mapped_column(Integer)
    sop_instance_uid: Mapped[str] = mapped_column(UID)
    frame_number: Mapped[int | None] = mapped_column(Integer, doc="1-based, multi-frame sources only")
    probabilities: Mapped[list[float]] = mapped_column(JSON)
    tumour_probability: Mapped[float] = mapped_column(Float)
    in_brain: Mapped[bool] = mapped_column(Boolean)
    is_key: Mapped[bool] = mapped_column(Boolean, default=False)
    cam_path: Mapped[str | None] = mapped_column(
        String(255), doc="Grad-CAM map (.npy; [map, image] for a slice of an axial reformat), relative to storage"
    )

    result: Mapped[Result] = relationship(back_populates="slice_predictions")

    __table_args__ = (UniqueConstraint("result_id", "slice_index"),)


class Output(Base):
    """One DICOM object we built; its UIDs are persisted before sending so a resend is identical."""

    __tablename__ = "outputs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id"), index=True)
    kind: Mapped[OutputKind] = mapped_column(_enum(OutputKind, "output_kind"))
    sop_class_uid: Mapped[str] = mapped_column(UID)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    series_instance_uid: Mapped[str] = mapped_column(UID)
    file_path: Mapped[str] = mapped_column(String(255))
    destination: Mapped[str | None] = mapped_column(String(64))
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    result: Mapped[Result] = relationship(back_populates="outputs")


class DestinationStatus(Base):
    """The circuit breaker of one destination (a configured peer outputs are sent to), shared by every worker.

    *Down* is a state of the destination, not a failure of a job: while down, its export jobs are not
    claimed and spend no attempts; housekeeping probes it (C-ECHO) with backoff until it answers.
    """

    __tablename__ = "destinations"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    state: Mapped[DestinationState] = mapped_column(
        _enum(DestinationState, "destination_state"), default=DestinationState.UP
    )
    down_since: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    probes: Mapped[int] = mapped_column(Integer, default=0, doc="failed probes since it went down")
    trial: Mapped[bool] = mapped_column(
        Boolean,
        default=False,
        server_default=false(),
        doc="up on a probe's word, no delivery confirmed since: going down again now spends the job's attempt",
    )
    next_probe_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_probe_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class User(Base):
    """A local console/API account (`triaged user add`); the password is stored only as an argon2 hash."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[UserRole] = mapped_column(_enum(UserRole, "user_role"))
    password_hash: Mapped[str] = mapped_column(String(255))
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_login_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class WebSession(Base):
    """A signed-in browser: the cookie holds a random token, the table only its SHA-256 (a leak grants nothing)."""

    __tablename__ = "web_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class ApiToken(Base):
    """A bearer token for scripts (`triaged user token NAME`); only its SHA-256 is stored."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    label: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class AuditEvent(Base):
    """One audit record (issue 12 item 8): append-only, enforced by database triggers (migration 0005).

    No PHI: peers by address and AE title, instances and series by :func:`triaged.log.uid_hash` only.
    """

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    kind: Mapped[str] = mapped_column(String(32), index=True)
    actor: Mapped[str] = mapped_column(String(64), default="", doc="OS user of an admin action; calling AE")
    peer_address: Mapped[str | None] = mapped_column(String(64))
    calling_ae_title: Mapped[str | None] = mapped_column(AE_TITLE)
    called_ae_title: Mapped[str | None] = mapped_column(AE_TITLE)
    outcome: Mapped[str] = mapped_column(String(32), default="", doc="accepted, rejected, ok, ...")
    reason: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
