"""Who may hold what: a connection per peer address at TCP accept, an association slot at A-ASSOCIATE-RQ.

Why two stages: a TCP connection that never sends its A-ASSOCIATE-RQ (a load balancer's health check, a
port scanner, a client stuck before associating) must not keep a real sender out. So a connection only
counts against ``dicom.max_connections_per_address`` (and is closed by the ARTIM timer if it stays
silent), and an association slot (``dicom.max_associations``) is taken only once the request has arrived
and its calling AE title is allowed. Both limits hold in total over a pool's processes
(:mod:`triaged.receive.slots`).

The A-ASSOCIATE-RJ fields are those of PS3.8 section 9.3.4: an unknown calling AE is rejected permanently
(result 1, source 1 "service user", reason 3 "calling AE title not recognised"), a called AE title that is
not ours likewise (reason 7 "called AE title not recognised"); the association limit
transiently (result 2, source 3 "service provider, presentation related", reason 2 "local limit
exceeded"), so that a sender retries later instead of giving up.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

from triaged.receive.slots import ASSOCIATION_BUCKET, SlotTable, address_bucket

REJECTED_PERMANENT = 0x01
REJECTED_TRANSIENT = 0x02
SOURCE_SERVICE_USER = 0x01
SOURCE_SERVICE_PROVIDER_ACSE = 0x02
SOURCE_SERVICE_PROVIDER_PRESENTATION = 0x03
REASON_NO_REASON_GIVEN = 0x01
REASON_CALLING_AE_NOT_RECOGNISED = 0x03
REASON_LOCAL_LIMIT_EXCEEDED = 0x02
REASON_CALLED_AE_NOT_RECOGNISED = 0x07


@dataclass(frozen=True)
class Rejection:
    """An A-ASSOCIATE-RJ to send, and the stable reason logged with it."""

    result: int
    source: int
    diagnostic: int
    reason: str


UNKNOWN_CALLING_AE = Rejection(
    REJECTED_PERMANENT, SOURCE_SERVICE_USER, REASON_CALLING_AE_NOT_RECOGNISED, "calling_ae_not_recognised"
)
UNKNOWN_CALLED_AE = Rejection(
    REJECTED_PERMANENT, SOURCE_SERVICE_USER, REASON_CALLED_AE_NOT_RECOGNISED, "called_ae_not_recognised"
)
ASSOCIATION_LIMIT = Rejection(
    REJECTED_TRANSIENT, SOURCE_SERVICE_PROVIDER_PRESENTATION, REASON_LOCAL_LIMIT_EXCEEDED, "association_limit"
)
#: When admission itself fails (a bug): refuse transiently rather than run an association without a slot.
ADMISSION_FAILED = Rejection(
    REJECTED_TRANSIENT, SOURCE_SERVICE_PROVIDER_ACSE, REASON_NO_REASON_GIVEN, "admission_failed"
)


@dataclass
class Ticket:
    """What one accepted TCP connection holds; released once, whichever way the connection ends."""

    address: str
    bucket: int
    holds_association: bool = False
    closed: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class Admission:
    """The limits of one receiver (or of all processes of a pool, through a shared :class:`SlotTable`).

    Parameters
    ----------
    slots
        The counts this receiver shares (with its sibling processes, if any).
    max_associations
        Associations at once, in total.
    max_connections_per_address
        Open TCP connections from one peer address at once, associated or not, in total.
    allowed_calling_ae_titles
        ``None`` accepts any calling AE title; otherwise only these (an empty set refuses all).
    called_ae_title
        ``None`` accepts a request addressed to any AE title; otherwise only requests addressed to this one
        (a sender configured for another node must learn so at once, not store its images here).
    """

    def __init__(
        self,
        slots: SlotTable,
        *,
        max_associations: int,
        max_connections_per_address: int,
        allowed_calling_ae_titles: Iterable[str] | None = None,
        called_ae_title: str | None = None,
    ) -> None:
        if max_associations < 1 or max_connections_per_address < 1:
            raise ValueError("limits must be at least 1")
        self.slots = slots
        self.max_associations = max_associations
        self.max_connections_per_address = max_connections_per_address
        self._allowed = None if allowed_calling_ae_titles is None else {t.strip() for t in allowed_calling_ae_titles}
        self._called = None if called_ae_title is None else called_ae_title.strip()

    def open_connection(self, address: str) -> Ticket | None:
        """A ticket for a new connection from ``address``, or ``None`` when that address has too many."""
        bucket = address_bucket(address)
        if not self.slots.try_acquire(bucket, self.max_connections_per_address):
            return None
        return Ticket(address=address, bucket=bucket)

    def request_association(self, ticket: Ticket, calling_ae_title: str, called_ae_title: str = "") -> Rejection | None:
        """Admit the A-ASSOCIATE-RQ of ``ticket``'s connection (taking a slot), or say how to reject it."""
        if self._called is not None and called_ae_title.strip() != self._called:
            return UNKNOWN_CALLED_AE
        if self._allowed is not None and calling_ae_title.strip() not in self._allowed:
            return UNKNOWN_CALLING_AE
        with ticket.lock:
            if ticket.closed or ticket.holds_association:
                raise RuntimeError("association requested twice on one connection, or after it closed")
            if not self.slots.try_acquire(ASSOCIATION_BUCKET, self.max_associations):
                return ASSOCIATION_LIMIT
            ticket.holds_association = True
        return None

    def release_association(self, ticket: Ticket) -> None:
        """Give the association slot back (idempotent): on release, abort or the connection closing."""
        with ticket.lock:
            if ticket.holds_association:
                ticket.holds_association = False
                self.slots.release(ASSOCIATION_BUCKET)

    def close_connection(self, ticket: Ticket) -> None:
        """Give back everything ``ticket`` holds (idempotent)."""
        self.release_association(ticket)
        with ticket.lock:
            if ticket.closed:
                return
            ticket.closed = True
        self.slots.release(ticket.bucket)

    def associations_in_use(self) -> int:
        return self.slots.total(ASSOCIATION_BUCKET)

    def connections_from(self, address: str) -> int:
        """Open connections counted for ``address`` (its bucket) over all processes."""
        return self.slots.total(address_bucket(address))
