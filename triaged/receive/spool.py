"""Receive a large C-STORE data set to the storage filesystem as it arrives, never whole in memory (issue 12).

pynetdicom collects a data set's P-DATA fragments in a ``BytesIO`` and hands the handler the whole thing, so
an instance costs its size in RAM (twice, once the handler copies it out) per association: 25 senders of 1 GB
enhanced multi-frame instances need ~50 GB. Its own ``STORE_RECV_CHUNKED_DATASET`` mode writes every data
set, small ones too, to a ``NamedTemporaryFile`` in ``$TMPDIR`` (another filesystem than storage, so the
file must be copied again; ~8 % CPU for the many small instances of an ordinary MR series).

Here, through pynetdicom's own buffer: once a C-STORE-RQ's command set is decoded, the message's ``BytesIO``
is swapped for a :class:`DatasetSpool` (a ``BytesIO`` subclass, which pynetdicom's primitives accept). It
keeps the first ``threshold`` bytes in memory; beyond that it writes the fragments, as they arrive, to a
temp file in the store's own temp directory (same filesystem: the final rename is atomic), preceded by the
File Meta Information built from the request, and hashes them on the way. The durable-acknowledge contract
is unchanged: the handler fsyncs, renames into place, fsyncs the directory and commits the row before
answering 0x0000 (:mod:`triaged.receive.ingest`).

A data set larger than ``max_bytes`` is counted but no longer stored (its temp file is removed at once),
and the handler refuses it; running out of disk mid-way is remembered the same way. Memory per association
is then bounded by ``threshold`` plus one PDU: pynetdicom reads each PDU whole, whatever its length field
says, so a peer that ignores our advertised maximum (``dicom.max_pdu_size``) has its connection closed
before the PDU body is read (:func:`_read_pdu_data`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import threading
from io import BytesIO
from pathlib import Path
from typing import Any

import structlog
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import P_DATA

from triaged.dicom.part10 import file_meta_bytes
from triaged.receive.storage import InstanceStore

log = structlog.get_logger()

_FACTORY_ATTRIBUTE = "_triaged_spool_factory"
_install_lock = threading.Lock()
_installed = {"done": False}


class DatasetSpool(BytesIO):
    """One C-STORE data set: in memory up to ``threshold`` bytes, then in a temp file on the store's filesystem.

    Written only by the association's DUL thread (pynetdicom's ``decode_msg``), read by its handler once the
    message is complete. ``meta`` is the File Meta Information the temp file starts with (empty when the
    request's UIDs cannot make one; the handler then copies the data set behind the right meta).
    """

    def __init__(self, store: InstanceStore, *, threshold: int, max_bytes: int, meta: bytes) -> None:
        super().__init__()
        self.store = store
        self.threshold = threshold
        self.max_bytes = max_bytes
        self.meta = meta
        self.size = 0  # data set bytes received (also those dropped after an overflow or error)
        self.overflow = False
        self.error: OSError | None = None
        self.path: Path | None = None
        self._fd: int | None = None
        self._sha = hashlib.sha256()

    @property
    def spooled(self) -> bool:
        """Whether the data set went to disk (or would have: overflow and errors count)."""
        return self._fd is not None or self.path is not None or self.overflow or self.error is not None

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        length = len(view)
        self.size += length
        if self.overflow or self.error is not None:
            return length
        if self.size > self.max_bytes:
            self.overflow = True
            self._drop()
            return length
        if self._fd is None:
            if self.size <= self.threshold:
                return super().write(view)
            self._open()
            if self._fd is None:
                return length
        self._write_file(view)
        return length

    def getvalue(self) -> bytes:
        """What is held in memory: ``b""`` once spooled (read the data set from :attr:`path` then).

        Not an error, because pynetdicom's own DIMSE logging handler asks for it; nothing of ours does.
        """
        if self.spooled:
            return b""
        return super().getvalue()

    def sha256_hex(self) -> str:
        """sha256 of the temp file's bytes (meta + data set) as written."""
        return self._sha.hexdigest()

    def finish(self) -> Path:
        """fsync and close the temp file; return its path (the data set starts at ``len(self.meta)``)."""
        if self._fd is None or self.path is None:
            raise RuntimeError("no spooled file to finish")
        fd, self._fd = self._fd, None
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return self.path

    def discard(self) -> None:
        """Remove the temp file, if any (idempotent); after a rename into place there is nothing to remove."""
        self._drop()

    def forget_path(self) -> None:
        """The temp file was renamed into place: it is no longer ours to delete."""
        self.path = None

    # ------------------------------------------------------------------ internals
    def _open(self) -> None:
        if not self.store.has_room_for(self.threshold):
            self.error = OSError(errno.ENOSPC, "free disk space below threshold")
            self._release_memory()
            return
        head = BytesIO.getvalue(self)
        self._release_memory()
        try:
            self.path, self._fd = self.store.open_temp()
        except OSError as exc:
            self.error = exc
            return
        self._write_file(memoryview(self.meta))
        self._write_file(memoryview(head))

    def _write_file(self, view: memoryview) -> None:
        if self._fd is None:
            return
        try:
            while view:
                written = os.write(self._fd, view)
                self._sha.update(view[:written])
                view = view[written:]
        except OSError as exc:
            self.error = exc
            self._drop()

    def _release_memory(self) -> None:
        self.seek(0)
        self.truncate(0)

    def _drop(self) -> None:
        self._release_memory()
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
        path, self.path = self.path, None
        if path is not None:
            with contextlib.suppress(OSError):
                path.unlink()


class Spooler:
    """Makes the spools of one receiver and removes those an association left behind (aborted mid-transfer)."""

    def __init__(self, store: InstanceStore, *, threshold: int, max_bytes: int) -> None:
        if threshold < 0 or max_bytes < 1:
            raise ValueError("threshold must be >= 0 and max_bytes >= 1")
        self.store = store
        self.threshold = threshold
        self.max_bytes = max_bytes

    def attach(self, assoc: Association) -> None:
        """From now on C-STORE data sets on ``assoc`` are received through spools."""
        spools: list[DatasetSpool] = []

        def factory(message: DIMSEMessage, received: bytes) -> DatasetSpool:
            spool = DatasetSpool(
                self.store, threshold=self.threshold, max_bytes=self.max_bytes, meta=_request_meta(message, assoc)
            )
            spool.write(received)
            spools.append(spool)
            return spool

        factory.spools = spools  # type: ignore[attr-defined]
        setattr(assoc, _FACTORY_ATTRIBUTE, factory)

    def detach(self, assoc: Association) -> None:
        """The association is over: remove the temp files of data sets it never completed."""
        factory = getattr(assoc, _FACTORY_ATTRIBUTE, None)
        if factory is None:
            return
        setattr(assoc, _FACTORY_ATTRIBUTE, None)
        for spool in factory.spools:
            spool.discard()


def _request_meta(message: DIMSEMessage, assoc: Association) -> bytes:
    """File Meta Information from the request's UIDs and the context's syntax; ``b""`` if they cannot make one."""
    try:
        command = message.command_set
        syntax = assoc._accepted_cx[int(message.context_id or 0)].transfer_syntax[0]
        return file_meta_bytes(str(command.AffectedSOPClassUID), str(command.AffectedSOPInstanceUID), str(syntax))
    except Exception:  # hostile or broken requests: the handler validates and answers; nothing may escape here
        return b""


_original_decode_msg = DIMSEMessage.decode_msg


def _decode_msg(self: DIMSEMessage, primitive: P_DATA, assoc: Association | None = None) -> bool:
    """pynetdicom's ``decode_msg``; then, for an incomplete C-STORE-RQ, its buffer becomes a spool."""
    complete = _original_decode_msg(self, primitive, assoc)
    if not complete and isinstance(self, C_STORE_RQ) and type(self.data_set) is BytesIO:
        factory = getattr(assoc, _FACTORY_ATTRIBUTE, None)
        if factory is not None:
            self.data_set = factory(self, self.data_set.getvalue())
    return complete


#: PDUs up to this length are always read (an A-ASSOCIATE-RQ with many presentation contexts, a small max PDU).
MIN_PDU_LIMIT = 1 << 20
#: Slack over the advertised maximum for the PDU and PDV headers.
_PDU_SLACK = 16


class PduTooLargeError(OSError):
    """A PDU longer than we advertised: pynetdicom's reader treats it as the connection ending (Evt17)."""


_original_read_pdu_data = DULServiceProvider._read_pdu_data


def _read_pdu_data(self: DULServiceProvider) -> None:
    """pynetdicom's PDU reader, refusing to read the body of a PDU longer than an acceptor advertised."""
    assoc = self.assoc
    maximum = int(getattr(assoc.ae, "maximum_pdu_size", 0) or 0) if assoc.is_acceptor else 0
    sock = self.socket
    if not maximum or sock is None:
        _original_read_pdu_data(self)
        return
    limit = max(maximum, MIN_PDU_LIMIT) + _PDU_SLACK
    real_recv = sock.recv
    headers_read = [False]

    def guarded_recv(nr_bytes: int) -> bytearray:
        if headers_read[0] and nr_bytes > limit:  # the second read is the PDU body of the announced length
            log.warning("pdu_too_large", length=nr_bytes, limit=limit, peer=f"{assoc.requestor.address}")
            raise PduTooLargeError(f"PDU of {nr_bytes} bytes exceeds {limit}")
        headers_read[0] = True
        return real_recv(nr_bytes)

    sock.recv = guarded_recv  # type: ignore[method-assign]
    try:
        _original_read_pdu_data(self)
    finally:
        del sock.recv  # back to the class's method


def install() -> None:
    """Route pynetdicom's C-STORE data sets through spools, process-wide (idempotent).

    Only associations a :class:`Spooler` attached to are affected; every other one (our own SCU
    associations, a plain pynetdicom AE in the same process) keeps pynetdicom's ``BytesIO``.
    """
    with _install_lock:
        if not _installed["done"]:
            DIMSEMessage.decode_msg = _decode_msg  # type: ignore[method-assign]
            DULServiceProvider._read_pdu_data = _read_pdu_data  # type: ignore[method-assign]
            _installed["done"] = True
