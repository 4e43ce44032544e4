"""C-STORE SCU for files as they are: the exact SOP class and transfer syntax of each file are proposed and
its dataset bytes are streamed unchanged (no decode, no re-encode), with TCP_NODELAY and a status per file.

Used by ``triaged send`` and ``triaged echo``; :func:`open_association` is reusable by other senders.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, evt
from pynetdicom.association import Association

from triaged.dicom.contexts import VERIFICATION_SOP_CLASS, configure_pynetdicom
from triaged.errors import DicomPeerError

log = structlog.get_logger()

MAX_CONTEXTS = 128  # PS3.8 9.3.2.2: presentation context IDs are odd numbers 1-255


@dataclass(frozen=True)
class DicomFile:
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str


@dataclass(frozen=True)
class SendResult:
    """Outcome of one file: ``status`` is the peer's DIMSE status, None when nothing was answered."""

    path: Path
    sop_instance_uid: str
    status: int | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and (self.status == 0x0000 or 0xB000 <= self.status <= 0xBFFF)


def iter_files(paths: Iterable[Path]) -> Iterator[Path]:
    """Files given directly, and every file below given directories (sorted, hidden ones skipped)."""
    for path in paths:
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                if child.is_file() and not any(part.startswith(".") for part in child.relative_to(path).parts):
                    yield child
        else:
            yield path


def read_dicom_file(path: Path) -> DicomFile:
    """Read just the File Meta Information; raise ValueError when ``path`` is not a DICOM Part 10 file."""
    try:
        meta = read_file_meta_info(path)
    except (InvalidDicomError, OSError, EOFError, KeyError, ValueError) as exc:
        raise ValueError(f"not a DICOM file: {exc}") from exc
    missing = [
        k for k in ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID") if k not in meta
    ]
    if missing:
        raise ValueError(f"file meta lacks {', '.join(missing)}")
    return DicomFile(
        path=path,
        sop_class_uid=str(meta.MediaStorageSOPClassUID),
        sop_instance_uid=str(meta.MediaStorageSOPInstanceUID),
        transfer_syntax_uid=str(meta.TransferSyntaxUID),
    )


def _nodelay(event: evt.Event) -> None:
    assoc_socket = event.assoc.dul.socket
    sock = assoc_socket.socket if assoc_socket is not None else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


@contextmanager
def open_association(
    host: str,
    port: int,
    *,
    called_ae_title: str,
    calling_ae_title: str,
    contexts: Sequence[tuple[str, str]],
    ssl_context: ssl.SSLContext | None = None,
    max_pdu_size: int = 0,
    timeout: float = 30.0,
) -> Iterator[Association]:
    """An established association proposing exactly ``contexts`` ((SOP class, transfer syntax) pairs).

    Raises :class:`DicomPeerError` when the peer cannot be reached or rejects; releases on exit.
    """
    configure_pynetdicom()
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    ae.maximum_pdu_size = max_pdu_size
    for sop_class, syntax in contexts:
        ae.add_requested_context(sop_class, syntax)
    tls_args: tuple[ssl.SSLContext, str] | None = (ssl_context, host) if ssl_context is not None else None
    handlers: list[Any] = [(evt.EVT_CONN_OPEN, _nodelay)]
    assoc = ae.associate(host, port, ae_title=called_ae_title, tls_args=tls_args, evt_handlers=handlers)
    if not assoc.is_established:
        close_socket(assoc)
        ae.shutdown()
        if assoc.is_rejected:
            raise DicomPeerError(f"{called_ae_title}@{host}:{port} rejected the association")
        if assoc.is_aborted:
            raise DicomPeerError(
                f"{called_ae_title}@{host}:{port} aborted the association (rejected, or accepted none of the "
                "proposed presentation contexts)"
            )
        raise DicomPeerError(f"could not associate with {called_ae_title}@{host}:{port}")
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()


def close_socket(assoc: Association) -> None:
    """pynetdicom can leave a failed requestor's socket open (e.g. plain TCP to a TLS port)."""
    assoc_socket = assoc.dul.socket
    if assoc_socket is not None and assoc_socket.socket is not None:
        with suppress(OSError):
            assoc_socket.socket.close()


def echo(host: str, port: int, *, called_ae_title: str, calling_ae_title: str, **kwargs: Any) -> int:
    """C-ECHO; return the peer's status (0x0000 on success)."""
    contexts = [(VERIFICATION_SOP_CLASS, "1.2.840.10008.1.2")]
    with open_association(
        host, port, called_ae_title=called_ae_title, calling_ae_title=calling_ae_title, contexts=contexts, **kwargs
    ) as assoc:
        rsp = assoc.send_c_echo()
        if "Status" not in rsp:
            raise DicomPeerError("no C-ECHO response (timeout or abort)")
        return int(rsp.Status)


def send_files(
    files: Sequence[DicomFile],
    host: str,
    port: int,
    *,
    called_ae_title: str,
    calling_ae_title: str,
    **kwargs: Any,
) -> list[SendResult]:
    """C-STORE ``files`` over as few associations as the 128-context limit allows; one result per file."""
    results: list[SendResult] = []
    for batch in _batches(files):
        contexts = sorted({(f.sop_class_uid, f.transfer_syntax_uid) for f in batch})
        with open_association(
            host, port, called_ae_title=called_ae_title, calling_ae_title=calling_ae_title, contexts=contexts, **kwargs
        ) as assoc:
            for index, item in enumerate(batch):
                if not assoc.is_established:
                    results += [SendResult(f.path, f.sop_instance_uid, None, "association lost") for f in batch[index:]]
                    break
                results.append(_store_one(assoc, item))
    return results


def _store_one(assoc: Association, item: DicomFile) -> SendResult:
    try:
        rsp = assoc.send_c_store(item.path)
    except (ValueError, AttributeError, OSError) as exc:
        return SendResult(item.path, item.sop_instance_uid, None, str(exc))
    if "Status" not in rsp:
        return SendResult(item.path, item.sop_instance_uid, None, "no response (timeout or abort)")
    comment = str(rsp.get("ErrorComment", "")) or None
    return SendResult(item.path, item.sop_instance_uid, int(rsp.Status), comment)


def _batches(files: Sequence[DicomFile]) -> Iterator[list[DicomFile]]:
    batch: list[DicomFile] = []
    contexts: set[tuple[str, str]] = set()
    for item in files:
        key = (item.sop_class_uid, item.transfer_syntax_uid)
        if key not in contexts and len(contexts) == MAX_CONTEXTS:
            yield batch
            batch, contexts = [], set()
        contexts.add(key)
        batch.append(item)
    if batch:
        yield batch
