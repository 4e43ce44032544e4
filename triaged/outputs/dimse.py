"""Send our output files to a PACS by C-STORE (PS3.4 B.2), checking every status.

One association per batch; exactly the SOP class and transfer syntax of each file is proposed, so the
peer never has to convert and a refusal is explicit. Files are streamed from disk (pynetdicom reads the
dataset bytes from the path), TCP_NODELAY is set on the socket as soon as it connects (field notes: Nagle
costs ~40 ms per instance otherwise). Warnings 0xB000/0xB006/0xB007 count as stored and are logged; any
other non-success status is a :class:`~triaged.errors.DicomSendError` carrying the status, and an
association that cannot be made is a :class:`~triaged.errors.DicomPeerError` — both retryable.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID
from pynetdicom import AE, evt
from pynetdicom.association import Association

from triaged.errors import DicomPeerError, DicomSendError
from triaged.log import uid_hash
from triaged.outputs.send import close_socket

log = structlog.get_logger()

STATUS_SUCCESS = 0x0000
# Coercion of data elements, elements discarded, data set does not match SOP class (PS3.4 B.2.3).
WARNING_STATUSES = frozenset({0xB000, 0xB006, 0xB007})
MAX_CONTEXTS = 128


@dataclass(frozen=True)
class Destination:
    """Where outputs go: a configured peer (name for messages, AE title, address, TLS when it requires it)."""

    name: str
    ae_title: str
    host: str
    port: int
    ssl_context: ssl.SSLContext | None = field(default=None, compare=False, repr=False)

    def __str__(self) -> str:
        return f"{self.name} ({self.ae_title}@{self.host}:{self.port})"


@dataclass(frozen=True)
class SendOptions:
    calling_ae_title: str = "TRIAGED"
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    connection_timeout: float = 10.0  # TCP connect: a black-holed PACS must not hold a worker for long


@dataclass(frozen=True)
class StoreResult:
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    status: int

    @property
    def warning(self) -> bool:
        return self.status in WARNING_STATUSES


@dataclass(frozen=True)
class _Item:
    path: Path
    sop_class_uid: UID
    sop_instance_uid: str
    transfer_syntax_uid: UID


def _nodelay(event: evt.Event) -> None:
    """EVT_CONN_OPEN: disable Nagle on the requestor socket before any PDU is sent."""
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _read_item(path: Path) -> _Item:
    try:
        ds = dcmread(path, stop_before_pixels=True)
        return _Item(path, UID(ds.SOPClassUID), str(ds.SOPInstanceUID), UID(ds.file_meta.TransferSyntaxUID))
    except (OSError, InvalidDicomError, AttributeError) as exc:
        raise DicomSendError(f"cannot read output file {path.name}: {exc}") from exc


def _associate(items: Sequence[_Item], destination: Destination, options: SendOptions) -> Association:
    contexts = sorted({(item.sop_class_uid, item.transfer_syntax_uid) for item in items})
    if len(contexts) > MAX_CONTEXTS:
        raise ValueError(f"{len(contexts)} presentation contexts needed; split the batch (max {MAX_CONTEXTS})")
    ae = AE(ae_title=options.calling_ae_title)
    ae.acse_timeout = options.acse_timeout
    ae.dimse_timeout = options.dimse_timeout
    ae.network_timeout = options.network_timeout
    ae.connection_timeout = options.connection_timeout
    for sop_class_uid, transfer_syntax_uid in contexts:
        ae.add_requested_context(sop_class_uid, transfer_syntax_uid)
    context = destination.ssl_context
    assoc = ae.associate(
        destination.host,
        destination.port,
        ae_title=destination.ae_title,
        evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)],
        tls_args=(context, destination.host) if context is not None else None,
    )
    if assoc.is_established:
        return assoc
    close_socket(assoc)  # pynetdicom can leave a failed requestor's socket open (e.g. a refused TLS handshake)
    why = "rejected the association" if assoc.is_rejected else "could not be reached or aborted the association"
    raise DicomPeerError(f"{destination} {why}")


def _accepted(assoc: Association, item: _Item) -> bool:
    return any(
        cx.abstract_syntax == item.sop_class_uid and cx.transfer_syntax == [item.transfer_syntax_uid]
        for cx in assoc.accepted_contexts
    )


def _store(assoc: Association, item: _Item, destination: Destination) -> StoreResult:
    if not _accepted(assoc, item):
        raise DicomSendError(
            f"{destination} did not accept {item.sop_class_uid.name} in {item.transfer_syntax_uid.name}"
        )
    try:
        status = assoc.send_c_store(item.path)
    except (RuntimeError, ValueError, OSError) as exc:
        raise DicomPeerError(f"C-STORE to {destination} failed: {exc}") from exc
    if "Status" not in status:
        raise DicomPeerError(f"no C-STORE response from {destination} (timeout or connection lost)")
    code = int(status.Status)
    fields = {"destination": destination.name, "sop_instance_uid": uid_hash(item.sop_instance_uid)}
    if code in WARNING_STATUSES:
        log.warning("pacs_store_warning", status=f"0x{code:04X}", comment=str(status.get("ErrorComment", "")), **fields)
    elif code != STATUS_SUCCESS:
        log.warning("pacs_store_failed", status=f"0x{code:04X}", **fields)
        comment = status.get("ErrorComment")
        detail = f": {comment}" if comment else ""
        raise DicomSendError(f"{destination} answered C-STORE status 0x{code:04X}{detail}", status=code)
    return StoreResult(item.path, str(item.sop_class_uid), item.sop_instance_uid, code)


def send_files(
    paths: Sequence[Path],
    destination: Destination,
    options: SendOptions | None = None,
    *,
    on_stored: Callable[[StoreResult], None] | None = None,
) -> list[StoreResult]:
    """C-STORE ``paths`` in order over one association; call ``on_stored`` after each confirmed store.

    Stops at the first failure (raising), so callers can persist progress from ``on_stored`` and resend
    only what is left. The association is always released or aborted before returning.
    """
    if not paths:
        return []
    options = options or SendOptions()
    items = [_read_item(Path(path)) for path in paths]
    assoc = _associate(items, destination, options)
    results: list[StoreResult] = []
    try:
        for item in items:
            result = _store(assoc, item, destination)
            results.append(result)
            if on_stored is not None:
                on_stored(result)
    except BaseException:
        if assoc.is_established:
            assoc.abort()
        raise
    if assoc.is_established:
        assoc.release()
    return results
