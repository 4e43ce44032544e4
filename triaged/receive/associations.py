"""The receiver's book of its associations: the ``associations`` table and their audit records.

Series completion waits until every association that sent to a series is closed (style P6), so each
accepted association gets a row when it is accepted and its ``closed_at`` when it ends, however it ends;
a restart closes what a crashed predecessor left open, and the reaper closes what a receiver that never
comes back left open (:mod:`triaged.db.receivers`). The same transactions write the audit trail
(:mod:`triaged.db.audit`): accepted with its row, what it stored with its close, and each rejection.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog
from sqlalchemy import Table, delete, or_, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from triaged.db import audit
from triaged.db.models import Association, Receiver
from triaged.db.receivers import close_open_associations, count_closed
from triaged.log import uid_hash

log = structlog.get_logger()

ASSOCIATIONS: Table = Association.__table__  # type: ignore[assignment]
RECEIVERS: Table = Receiver.__table__  # type: ignore[assignment]


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class AssociationState:
    """What the receiver knows of one acceptor association while it runs."""

    calling_ae_title: str
    address: str
    called_ae_title: str = ""
    row_id: int | None = None
    closed: bool = False
    stored: list[str] = field(default_factory=list)  # uid_hash of each instance stored (audit)
    refused: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, sop_instance_uid: str, *, stored: bool) -> None:
        if stored:
            self.stored.append(uid_hash(sop_instance_uid))
        else:
            self.refused += 1


def default_receiver_id(ae_title: str, port: int) -> str:
    """Stable across restarts of the same listener, so a restart can close what its predecessor left open."""
    return f"{socket.gethostname()}:{ae_title}:{port}"


def close_stale_associations(session_factory: sessionmaker[Session], receiver_id: str) -> int:
    """Close rows a crashed predecessor left open under ``receiver_id`` or its processes' ``receiver_id:N``.

    Open rows hold back series completion; whatever ran before (one process or a pool of any size) is gone
    once this receiver id binds its port again. Each closed association gets one ``association_closed`` audit
    record (outcome ``restarted``), as when the reaper or ``receivers forget`` closes one: the crashed
    predecessor never wrote its ``instances_stored`` record, so this is the trail's only word on it.
    """
    ids = ASSOCIATIONS.c.receiver_id
    with session_factory.begin() as session:
        stale_ids = session.scalars(
            select(ids)
            .where(
                or_(ids == receiver_id, ids.startswith(f"{receiver_id}:", autoescape=True)),
                ASSOCIATIONS.c.closed_at.is_(None),
            )
            .distinct()
            .order_by(ids)
        ).all()
        now = utcnow()
        closed = [
            item
            for stale in stale_ids
            for item in close_open_associations(
                session, stale, now=now, outcome="restarted", reason="receiver_restarted", actor="receiver"
            )
        ]
        # The liveness rows of an earlier pool's processes: they are gone, and this start re-registers its own.
        session.execute(delete(RECEIVERS).where(RECEIVERS.c.id.startswith(f"{receiver_id}:", autoescape=True)))
    count_closed("restarted", len(closed))
    if closed:
        log.warning("stale_associations_closed", count=len(closed), receiver_id=receiver_id)
    return len(closed)


class AssociationBook:
    """Per-association state of one receiver, and the rows it writes for them."""

    def __init__(self, session_factory: sessionmaker[Session], receiver_id: str) -> None:
        self.session_factory = session_factory
        self.receiver_id = receiver_id
        self._states: dict[int, AssociationState] = {}
        self._lock = threading.Lock()

    def admitted(self, assoc: Any, *, calling_ae_title: str, called_ae_title: str, address: str) -> None:
        """An A-ASSOCIATE-RQ was admitted (the AE titles are known only from its primitive at this point)."""
        with self._lock:
            self._states[id(assoc)] = AssociationState(calling_ae_title, address, called_ae_title)

    def state(self, assoc: Any) -> AssociationState:
        with self._lock:
            state = self._states.get(id(assoc))
            if state is None:
                address = f"{assoc.requestor.address}:{assoc.requestor.port}"
                state = AssociationState(calling_ae_title=str(assoc.requestor.ae_title or "").strip(), address=address)
                self._states[id(assoc)] = state
            return state

    def open_row(self, state: AssociationState) -> int:
        """The association's row id, inserting it (and its ``association_accepted`` audit record) once."""
        with state.lock:
            if state.row_id is None:
                with self.session_factory.begin() as session:
                    row_id = session.scalar(
                        ASSOCIATIONS.insert()
                        .values(
                            calling_ae_title=state.calling_ae_title[:16],
                            peer_address=state.address[:64],
                            receiver_id=self.receiver_id,
                            opened_at=utcnow(),
                        )
                        .returning(ASSOCIATIONS.c.id)
                    )
                    if row_id is None:
                        raise RuntimeError("association insert returned no id")
                    audit.record_association(
                        session,
                        accepted=True,
                        peer_address=state.address,
                        calling_ae_title=state.calling_ae_title,
                        called_ae_title=state.called_ae_title,
                    )
                    state.row_id = int(row_id)
            return state.row_id

    def rejected(self, *, address: str, calling_ae_title: str, called_ae_title: str, reason: str) -> None:
        """Audit an A-ASSOCIATE-RJ; a database failure loses only the record (logged), never the reject."""
        try:
            with self.session_factory.begin() as session:
                audit.record_association(
                    session,
                    accepted=False,
                    peer_address=address,
                    calling_ae_title=calling_ae_title,
                    called_ae_title=called_ae_title,
                    reason=reason,
                )
        except SQLAlchemyError as exc:
            log.error("audit_record_failed", kind=audit.ASSOCIATION_REJECTED, error=type(exc).__name__)

    def closed(self, assoc: Any, how: str) -> None:
        """Set ``closed_at`` and audit what the association stored (idempotent: the first end event wins)."""
        with self._lock:
            state = self._states.pop(id(assoc), None)
        if state is None:
            return
        with state.lock:
            if state.closed or state.row_id is None:
                state.closed = True
                return
            state.closed = True
            try:
                with self.session_factory.begin() as session:
                    session.execute(
                        update(ASSOCIATIONS).where(ASSOCIATIONS.c.id == state.row_id).values(closed_at=utcnow())
                    )
                    if state.stored or state.refused:  # a C-ECHO-only association (monitoring) stored nothing
                        audit.record_instances_stored(
                            session,
                            association_id=state.row_id,
                            peer_address=state.address,
                            calling_ae_title=state.calling_ae_title,
                            instance_hashes=state.stored,
                            refused=state.refused,
                        )
            except SQLAlchemyError as exc:
                # The next start closes it (stale association); completion waits until then.
                log.error("association_close_failed", error=type(exc).__name__, row_id=state.row_id)
                return
        log.info("association_closed", calling_ae=state.calling_ae_title, row_id=state.row_id, how=how)
