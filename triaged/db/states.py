"""The states and kinds stored in the database, as plain string enums (no SQLAlchemy needed to use them).

The CLI's options are typed with them, so `triaged --help` can list the choices without importing SQLAlchemy;
:mod:`triaged.db.models` maps them to columns and re-exports them.
"""

from __future__ import annotations

import enum


class SeriesState(enum.StrEnum):
    RECEIVING = "receiving"
    COMPLETE = "complete"
    QUEUED = "queued"
    PROCESSING = "processing"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"


class JobKind(enum.StrEnum):
    INFER = "infer"
    EXPORT = "export"


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"  # permanent error: retrying cannot help
    DEAD = "dead"  # retryable errors until max_attempts ran out


class DestinationState(enum.StrEnum):
    UP = "up"
    DOWN = "down"  # unreachable, timed out or rejecting associations: its exports wait, it is probed


class ResultStatus(enum.StrEnum):
    ASSESSED = "assessed"
    NOT_ASSESSABLE = "not_assessable"


class OutputKind(enum.StrEnum):
    SECONDARY_CAPTURE = "sc"
    KEY_OBJECT_SELECTION = "kos"
    STRUCTURED_REPORT = "sr"


class UserRole(enum.StrEnum):
    VIEWER = "viewer"  # reads pages and the JSON API
    ADMIN = "admin"  # also reprocess, retry, resend


class AuditKind(enum.StrEnum):
    """What an ``audit_events`` row records (:mod:`triaged.db.audit`)."""

    ASSOCIATION_ACCEPTED = "association_accepted"
    ASSOCIATION_REJECTED = "association_rejected"
    INSTANCES_STORED = "instances_stored"
    ASSOCIATION_CLOSED = (
        "association_closed"  # closed for a receiver that is gone (reaper, `receivers forget`, or its restart)
    )
    ADMIN_ACTION = "admin_action"
    EXPORT = "export"  # one per export job that ended: delivered (sent) or given up (dead/failed)
