"""The DICOM receiver: a pynetdicom Storage SCP that acknowledges only durably stored instances.

Handlers are thin (style P5): the C-STORE handler hands the encoded dataset (or, for a large one, the
file it was received to: :mod:`triaged.receive.spool`) to :class:`Ingestor` and returns its status;
association handlers keep the ``associations`` table and the audit trail current through
:class:`~triaged.receive.associations.AssociationBook`, which series completion reads (P6). No exception
ever reaches pynetdicom (P4). Who may connect and associate is decided by
:class:`~triaged.receive.admission.Admission`: per peer address when the connection is accepted
(:mod:`triaged.receive.server`), and for an association slot in the ``EVT_REQUESTED`` handler, once the
A-ASSOCIATE-RQ has arrived.
"""

from __future__ import annotations

import os
import socket
import socketserver
import time
from typing import Any, cast

import structlog
from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from triaged.config import Settings
from triaged.db import receivers
from triaged.dicom.contexts import configure_pynetdicom, scp_contexts
from triaged.receive import spool as spooling
from triaged.receive import status
from triaged.receive.admission import ADMISSION_FAILED, ASSOCIATION_LIMIT, REJECTED_TRANSIENT, Admission
from triaged.receive.associations import AssociationBook, close_stale_associations, default_receiver_id, utcnow
from triaged.receive.ingest import Ingestor, StoreRequest
from triaged.receive.server import ReceiverAE, ticket_of
from triaged.receive.slots import SlotTable
from triaged.receive.spool import DatasetSpool, Spooler
from triaged.receive.storage import InstanceStore
from triaged.receive.tls import server_ssl_context

log = structlog.get_logger()


class Receiver:
    """Storage SCP bound to ``settings.dicom``; :meth:`start` returns at once, :meth:`stop` drains."""

    def __init__(
        self,
        settings: Settings,
        session_factory: sessionmaker[Session],
        store: InstanceStore,
        *,
        receiver_id: str | None = None,
        port: int | None = None,
        reuse_port: bool = False,
        slots: SlotTable | None = None,
    ) -> None:
        self.settings = settings
        self.session_factory = session_factory
        self.store = store
        self.ingestor = Ingestor(store, session_factory)
        self.spooler = Spooler(
            store, threshold=settings.dicom.spool_threshold_bytes, max_bytes=settings.dicom.max_instance_bytes
        )
        # ``port`` overrides settings (0 = an ephemeral port, handy for tests and several receivers).
        self._bind_port = settings.dicom.port if port is None else port
        self._reuse_port = reuse_port  # SO_REUSEPORT: share the port with sibling processes (ReceiverPool)
        self.receiver_id = receiver_id or default_receiver_id(settings.dicom.ae_title, self._bind_port)
        dicom = settings.dicom
        # ``slots`` shared with sibling processes makes the limits hold in total over a ReceiverPool.
        self.admission = Admission(
            slots or SlotTable.private(),
            max_associations=dicom.max_associations,
            max_connections_per_address=dicom.max_connections_per_address,
            allowed_calling_ae_titles=(
                None if dicom.accept_unknown_peers else [peer.ae_title for peer in dicom.peers.values()]
            ),
            called_ae_title=dicom.ae_title if dicom.require_called_ae_title else None,
        )
        self._server: ThreadedAssociationServer | None = None
        self._ae: ReceiverAE | None = None
        self.book = AssociationBook(session_factory, self.receiver_id)
        self._accepting = False

    # ------------------------------------------------------------------ lifecycle
    @property
    def port(self) -> int:
        """The port actually bound (settings port 0 picks a free one)."""
        if self._server is None:
            raise RuntimeError("receiver is not started")
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Close associations a crashed predecessor left open, clean temp files, and start listening."""
        if self._server is not None:
            raise RuntimeError("receiver already started")
        configure_pynetdicom()
        spooling.install()
        self.ingestor.committer.start()
        self.store.cleanup_stale_temp_files()
        self._close_stale_associations()
        receivers.register(self.session_factory, self.receiver_id)  # alive from now: the reaper spares it
        dicom = self.settings.dicom
        ae = ReceiverAE(dicom.ae_title, self.admission, artim_timeout=dicom.artim_timeout, reuse_port=self._reuse_port)
        ae.supported_contexts = scp_contexts(dicom.extra_storage_sop_classes)
        ae.maximum_pdu_size = dicom.max_pdu_size
        ae.dimse_timeout = dicom.dimse_timeout
        ae.network_timeout = dicom.network_timeout
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
            (evt.EVT_CONN_CLOSE, self._on_closed),
            (evt.EVT_C_ECHO, self._on_c_echo),
            (evt.EVT_C_STORE, self._on_c_store),
        ]
        self._accepting = True
        server = ae.start_server(
            (dicom.bind_address, self._bind_port),
            block=False,
            ssl_context=server_ssl_context(dicom.tls),
            evt_handlers=handlers,
        )
        if server is None:  # only a blocking start returns None
            raise RuntimeError("pynetdicom did not return a server")
        self._server = server
        self._ae = ae
        log.info(
            "receiver_started",
            ae_title=dicom.ae_title,
            address=dicom.bind_address,
            port=self.port,
            tls=dicom.tls.enabled,
            receiver_id=self.receiver_id,
            max_associations=dicom.max_associations,
            max_connections_per_address=dicom.max_connections_per_address,
            artim_timeout=dicom.artim_timeout,
            max_instance_bytes=dicom.max_instance_bytes,
            spool_threshold_bytes=dicom.spool_threshold_bytes,
        )

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting, let in-flight associations finish (up to ``timeout`` s), then abort the rest."""
        server = self._server
        if server is None:
            return
        self._accepting = False
        socketserver.BaseServer.shutdown(server)  # stop the accept loop ...
        server.server_close()  # ... and close the listening socket; accepted associations keep running
        deadline = time.monotonic() + timeout
        # Wait only for established associations: a connection still negotiating (or still silent, which
        # ARTIM closes) has nothing in flight to lose.
        while any(a.is_established for a in server.active_associations) and time.monotonic() < deadline:
            time.sleep(0.05)
        leftover = server.active_associations
        for assoc in leftover:
            assoc.abort()
        join_deadline = time.monotonic() + 2
        for assoc in leftover:
            assoc.join(timeout=max(0.0, join_deadline - time.monotonic()))
        server.shutdown()
        if self._ae is not None:
            self._ae.shutdown()
        self.ingestor.committer.stop()
        self._server = None
        try:
            receivers.mark_stopped(self.session_factory, [self.receiver_id])
        except SQLAlchemyError as exc:  # only `receivers list` misses it: its heartbeat runs out all the same
            log.warning("receiver_stop_record_failed", error=type(exc).__name__)
        log.info("receiver_stopped", aborted=len(leftover))

    @property
    def receiver_ids(self) -> list[str]:
        """The ids its associations are recorded under (one: this process)."""
        return [self.receiver_id]

    def heartbeat(self) -> None:
        """Tell the database this receiver is alive (the daemon's scheduler calls it every heartbeat_seconds)."""
        receivers.beat(self.session_factory, {self.receiver_id: os.getpid()})

    def _close_stale_associations(self) -> None:
        close_stale_associations(self.session_factory, self.receiver_id)

    def _on_conn_open(self, event: evt.Event) -> None:
        try:
            assoc_socket = event.assoc.dul.socket
            sock = assoc_socket.socket if assoc_socket is not None else None
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (AttributeError, OSError) as exc:
            log.warning("tcp_nodelay_failed", error=str(exc))

    def _on_requested(self, event: evt.Event) -> None:
        """Admit or reject an A-ASSOCIATE-RQ before pynetdicom negotiates it (an association slot is taken here)."""
        assoc = event.assoc
        requestor = assoc.requestor
        # pynetdicom copies the calling AE title to ``requestor`` only while negotiating, after this event.
        primitive = requestor.primitive
        calling_ae = str(primitive.calling_ae_title if primitive is not None else "").strip()
        called_ae = str(primitive.called_ae_title if primitive is not None else "").strip()
        peer = f"{requestor.address}:{requestor.port}"
        ticket = ticket_of(assoc)
        try:
            rejection = (
                self.admission.request_association(ticket, calling_ae, called_ae) if ticket is not None else None
            )
        except Exception:  # P4: nothing escapes to pynetdicom; refuse rather than run without a slot
            log.exception("association_admission_failed", peer=peer)
            rejection = ADMISSION_FAILED
        if rejection is None:
            self.spooler.attach(assoc)  # before any P-DATA: large data sets go to disk as they arrive
            self.book.admitted(assoc, calling_ae_title=calling_ae, called_ae_title=called_ae, address=peer)
            return
        if rejection is ASSOCIATION_LIMIT:
            log.warning(
                "association_rejected_limit",
                calling_ae=calling_ae,
                peer=peer,
                limit=self.admission.max_associations,
                in_use=self.admission.associations_in_use(),
                transient=True,
            )
        else:
            log.warning(
                "association_rejected",
                calling_ae=calling_ae,
                called_ae=called_ae,
                peer=peer,
                reason=rejection.reason,
                transient=rejection.result == REJECTED_TRANSIENT,
            )
        # As pynetdicom does for its own rejections: send the A-ASSOCIATE-RJ, then wait (ARTIM) for the
        # peer to close, so the reject is on the wire before the socket is shut.
        assoc.acse.send_reject(rejection.result, rejection.source, rejection.diagnostic)
        # Audited after the RJ is on the wire: the peer is not kept waiting for the database.
        self.book.rejected(
            address=peer, calling_ae_title=calling_ae, called_ae_title=called_ae, reason=rejection.reason
        )
        assoc.kill()

    def _on_accepted(self, event: evt.Event) -> None:
        state = self.book.state(event.assoc)
        # Handlers of one association run on its own thread: bind log context once for all of them (P10).
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(calling_ae=state.calling_ae_title)
        try:
            self.book.open_row(state)
        except SQLAlchemyError as exc:  # retried lazily by the first C-STORE
            log.error("association_record_failed", error=type(exc).__name__)
        log.info("association_accepted", calling_ae=state.calling_ae_title, peer=state.address, row_id=state.row_id)

    def _on_rejected(self, event: evt.Event) -> None:
        """pynetdicom's own rejections (ours are logged by :meth:`_on_requested`), with the RJ fields."""
        requestor = event.assoc.requestor
        primitive = event.assoc.acceptor.primitive
        calling_ae = str(requestor.ae_title or "").strip()
        peer = f"{requestor.address}:{requestor.port}"
        diagnostic = getattr(primitive, "diagnostic", None)
        log.warning(
            "association_rejected",
            calling_ae=calling_ae,
            peer=peer,
            reason="pynetdicom",
            result=getattr(primitive, "result", None),
            source=getattr(primitive, "result_source", None),
            diagnostic=diagnostic,
        )
        called_ae = str(event.assoc.acceptor.ae_title or "").strip()
        self.book.rejected(
            address=peer, calling_ae_title=calling_ae, called_ae_title=called_ae, reason=f"pynetdicom_{diagnostic}"
        )

    def _on_closed(self, event: evt.Event) -> None:
        ticket = ticket_of(event.assoc)
        if ticket is not None:  # the slot is free as soon as the association is over
            self.admission.release_association(ticket)
        self.spooler.detach(event.assoc)  # temp files of data sets an abort cut short
        self.book.closed(event.assoc, event.event.name)

    # ------------------------------------------------------------------ DIMSE handlers
    def _on_c_echo(self, event: evt.Event) -> int:
        return status.SUCCESS

    def _on_c_store(self, event: evt.Event) -> int | Dataset:
        request = cast(C_STORE, event.request)
        received = request.DataSet
        spool = received if isinstance(received, DatasetSpool) and received.spooled else None
        try:
            if not self._accepting:
                return status.failure(status.PROCESSING_FAILURE, "receiver is shutting down")
            state = self.book.state(event.assoc)
            try:
                row_id: int | None = self.book.open_row(state)
            except SQLAlchemyError:
                return status.failure(status.OUT_OF_RESOURCES_STORE_FAILED, "database unavailable")
            store_request = StoreRequest(
                sop_class_uid=str(request.AffectedSOPClassUID or ""),
                sop_instance_uid=str(request.AffectedSOPInstanceUID or ""),
                transfer_syntax_uid=str(event.context.transfer_syntax),
                dataset=b"" if spool is not None else event.encoded_dataset(include_meta=False),
                calling_ae_title=state.calling_ae_title,
                association_id=row_id,
                spool=spool,
                max_bytes=self.settings.dicom.max_instance_bytes,
            )
            code, comment, _ = self.ingestor.store_instance(store_request, now=utcnow())
            state.count(store_request.sop_instance_uid, stored=code == status.SUCCESS)
        except Exception:  # P4: nothing escapes to pynetdicom
            log.exception("store_handler_failed")
            return status.failure(status.OUT_OF_RESOURCES_STORE_FAILED, "internal error while storing")
        finally:
            if spool is not None:
                spool.discard()  # stored (renamed away: nothing left) or refused: no temp file stays
        return code if code == status.SUCCESS else status.failure(code, comment)
