"""Store one received instance: parse just the UIDs, write the file durably, commit the rows (design: Receiving).

Independent of pynetdicom events so it can be reasoned about and tested on its own: the receiver hands
over the request's SOP class/instance UIDs, the accepted transfer syntax and the encoded dataset bytes
exactly as received; :meth:`Ingestor.store` returns the DIMSE status to answer. Nothing is decoded.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

import structlog
from pydicom.errors import InvalidDicomError
from sqlalchemy.orm import Session, sessionmaker

from triaged import metrics
from triaged.dicom.part10 import file_meta_bytes, read_identifiers
from triaged.dicom.uids import uid_path, validate_uid
from triaged.errors import InvalidUidError, OutOfSpaceError, StoreError
from triaged.log import uid_hash
from triaged.receive import status
from triaged.receive.committer import GroupCommitter
from triaged.receive.records import InstanceFacts, RecordOutcome
from triaged.receive.spool import DatasetSpool
from triaged.receive.storage import InstanceStore

log = structlog.get_logger()

_LOCK_STRIPES = 64
#: Instances up to this size have their rows prepared while the file is written (pipelined commit); larger
#: ones are written first, so a long write never holds the database write lock.
PIPELINE_MAX_BYTES = 8 * 1024 * 1024
_COPY_CHUNK = 1 << 20


@dataclass(frozen=True)
class StoreRequest:
    """What the receiver knows about one C-STORE: request UIDs, negotiated syntax, raw dataset bytes."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    dataset: bytes
    calling_ae_title: str
    association_id: int | None
    #: A data set received to disk (``dataset`` is then empty): see :mod:`triaged.receive.spool`.
    spool: DatasetSpool | None = None
    #: Larger data sets are refused (``dicom.max_instance_bytes``).
    max_bytes: int | None = None


class RejectError(Exception):
    """Internal: carries the status to answer; never leaves :meth:`Ingestor.store`."""

    def __init__(self, code: int, comment: str) -> None:
        super().__init__(comment)
        self.code = code
        self.comment = comment


def _spooled_dataset(spool: DatasetSpool) -> BinaryIO:
    """The spooled file, positioned at the data set (after the meta it starts with)."""
    if spool.path is None:
        raise RuntimeError("spool has no file")
    fp = spool.path.open("rb")
    fp.seek(len(spool.meta))
    return fp


def parse_facts(request: StoreRequest) -> InstanceFacts:
    """Read only the identifying attributes (no pixel data); raise :class:`RejectError` on bad input."""
    try:
        if request.spool is not None:
            with _spooled_dataset(request.spool) as fp:
                ds = read_identifiers(fp, request.transfer_syntax_uid)
        else:
            ds = read_identifiers(request.dataset, request.transfer_syntax_uid)
        sop_class: str = str(ds.get("SOPClassUID", "") or "")
        sop_instance: str = str(ds.get("SOPInstanceUID", "") or "")
        modality = str(ds.get("Modality", "") or "")[:16]
        study_uid: str = str(ds.get("StudyInstanceUID", "") or "")
        series_uid: str = str(ds.get("SeriesInstanceUID", "") or "")
        raw_number = ds.get("InstanceNumber")
        instance_number = int(raw_number) if raw_number not in (None, "") else None
    except (InvalidDicomError, ValueError, TypeError, OverflowError, EOFError, OSError, KeyError) as exc:
        raise RejectError(status.CANNOT_UNDERSTAND, f"dataset cannot be parsed: {type(exc).__name__}") from exc
    except Exception as exc:  # pydicom raises many types on corrupt input; none may escape (P4)
        raise RejectError(status.CANNOT_UNDERSTAND, f"dataset cannot be parsed: {type(exc).__name__}") from exc
    try:
        sop_instance = validate_uid(sop_instance)
        study_uid = validate_uid(study_uid)
        series_uid = validate_uid(series_uid)
        sop_class = validate_uid(sop_class)
    except InvalidUidError as exc:
        raise RejectError(status.CANNOT_UNDERSTAND_INVALID_UID, f"invalid UID in dataset: {exc}") from exc
    if sop_class != request.sop_class_uid:
        raise RejectError(status.DATASET_DOES_NOT_MATCH_SOP_CLASS, "dataset SOP Class UID differs from request")
    if sop_instance != request.sop_instance_uid:
        # Tolerant reading (P9): real files exist whose file meta disagrees with the dataset, and senders
        # that take the request UID from the meta. The dataset is the truth; log it and store by it.
        log.warning(
            "store_uid_mismatch",
            request_sop_instance_uid=uid_hash(request.sop_instance_uid),
            sop_instance_uid=uid_hash(sop_instance),
        )
    return InstanceFacts(
        sop_instance_uid=sop_instance,
        sop_class_uid=sop_class,
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        modality=modality,
        instance_number=instance_number,
        transfer_syntax_uid=request.transfer_syntax_uid,
    )


class Ingestor:
    """The durable-acknowledge path shared by every association of one receiver."""

    def __init__(
        self,
        store: InstanceStore,
        session_factory: sessionmaker[Session],
        committer: GroupCommitter | None = None,
    ) -> None:
        self.store = store
        self.session_factory = session_factory
        # Unstarted, the committer commits on the caller's thread; the receiver starts it (group commit).
        self.committer = committer or GroupCommitter(session_factory)
        # Serialise work on the same SOP Instance UID within this process (re-sends racing each other).
        self._locks = [threading.Lock() for _ in range(_LOCK_STRIPES)]

    def store_instance(self, request: StoreRequest, *, now: datetime) -> tuple[int, str, RecordOutcome | None]:
        """Store one instance; return ``(status, comment, outcome)``. Never raises."""
        try:
            outcome = self._store(request, now)
        except RejectError as failure:
            metrics.INSTANCES_REJECTED.labels(reason=status.status_name(failure.code)).inc()
            log.warning(
                "store_rejected",
                status=f"0x{failure.code:04X}",
                reason=status.status_name(failure.code),
                comment=failure.comment,
                sop_instance_uid=uid_hash(request.sop_instance_uid),
            )
            return failure.code, failure.comment, None
        except Exception:  # last line of defence (P4): an escaping exception becomes a generic 0xC211
            metrics.INSTANCES_REJECTED.labels(reason="internal_error").inc()
            log.exception("store_internal_error", sop_instance_uid=uid_hash(request.sop_instance_uid))
            return status.OUT_OF_RESOURCES_STORE_FAILED, "internal error while storing", None
        metrics.INSTANCES_RECEIVED.inc()
        return status.SUCCESS, "", outcome

    def _store(self, request: StoreRequest, now: datetime) -> RecordOutcome:
        try:
            request_uid = validate_uid(request.sop_instance_uid)
            validate_uid(request.sop_class_uid)
        except InvalidUidError as exc:
            raise RejectError(status.CANNOT_UNDERSTAND_INVALID_UID, f"invalid UID in request: {exc}") from exc
        _check_received(request)
        facts = parse_facts(request)
        meta = file_meta_bytes(request.sop_class_uid, facts.sop_instance_uid, request.transfer_syntax_uid)
        content = _Content.of(request, meta)
        sha, size = content.sha256, content.size
        relative = uid_path(facts.sop_instance_uid, f".{sha[:16]}.dcm")
        lock = self._locks[hash(facts.sop_instance_uid) % _LOCK_STRIPES]
        with lock:
            submit = functools.partial(
                self.committer.submit,
                facts,
                file_path=relative,
                size_bytes=size,
                sha256=sha,
                calling_ae_title=request.calling_ae_title,
                association_id=request.association_id,
                now=now,
            )
            # Small files: rows are prepared while the file is written (see committer), committed once durable.
            record = submit() if size <= PIPELINE_MAX_BYTES else None
            try:
                created = self._write(relative, content)
            except BaseException:
                if record is not None:
                    record.withdraw()
                raise
            if record is None:
                record = submit()
            try:
                outcome = record.file_durable()
            except Exception as exc:
                # The file stays: a failed COMMIT may still have committed (e.g. connection lost during it),
                # and deleting would then leave a row without its file. An unreferenced complete file is
                # harmless and content-addressed, so the sender's retry reuses it.
                log.error(
                    "store_commit_failed",
                    error=type(exc).__name__,
                    file_created=created,
                    sop_instance_uid=uid_hash(request_uid),
                )
                raise RejectError(status.OUT_OF_RESOURCES_STORE_FAILED, "database unavailable") from exc
        log.debug(
            "store_received",
            sop_instance_uid=uid_hash(request_uid),
            series_instance_uid=uid_hash(facts.series_instance_uid),
            outcome=outcome.kind,
        )
        if request.spool is not None:
            log.info("store_received_to_disk", sop_instance_uid=uid_hash(request_uid), size_bytes=size)
        return outcome

    def _write(self, relative: str, content: _Content) -> bool:
        """Write the file unless this exact content is already stored; return whether we created it."""
        if self.store.exists(relative):
            return False
        try:
            content.write(self.store, relative)
        except OutOfSpaceError as exc:
            raise RejectError(status.OUT_OF_RESOURCES, "out of resources: disk full or below threshold") from exc
        except StoreError as exc:
            log.error("store_write_failed", error=str(exc))
            raise RejectError(status.OUT_OF_RESOURCES_STORE_FAILED, "could not write the instance") from exc
        return True


def _check_received(request: StoreRequest) -> None:
    """Refuse what was too large or could not be received to disk, before parsing anything."""
    spool = request.spool
    size = spool.size if spool is not None else len(request.dataset)
    if (spool is not None and spool.overflow) or (request.max_bytes is not None and size > request.max_bytes):
        raise RejectError(status.INSTANCE_TOO_LARGE, f"instance larger than {request.max_bytes} bytes")
    if spool is not None and spool.error is not None:
        log.error("store_spool_failed", error=spool.error.strerror or str(spool.error))
        if spool.error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise RejectError(status.OUT_OF_RESOURCES, "out of resources: disk full or below threshold")
        raise RejectError(status.OUT_OF_RESOURCES_STORE_FAILED, "could not write the instance")


@dataclass(frozen=True)
class _Content:
    """The file to store: meta + data set, from memory or from a spool; its sha256 and size."""

    meta: bytes
    dataset: bytes
    spool: DatasetSpool | None
    sha256: str
    size: int

    @classmethod
    def of(cls, request: StoreRequest, meta: bytes) -> _Content:
        spool = request.spool
        if spool is None:
            digest = hashlib.sha256(meta)
            digest.update(request.dataset)
            return cls(meta, request.dataset, None, digest.hexdigest(), len(meta) + len(request.dataset))
        if spool.meta == meta:  # the usual case: the spooled file is the file to store, hashed on arrival
            return cls(meta, b"", spool, spool.sha256_hex(), len(meta) + spool.size)
        # The data set's UIDs differ from the request's (tolerated, see parse_facts): hash it behind our meta.
        digest = hashlib.sha256(meta)
        for chunk in _spooled_chunks(spool):
            digest.update(chunk)
        return cls(meta, b"", spool, digest.hexdigest(), len(meta) + spool.size)

    def write(self, store: InstanceStore, relative: str) -> None:
        spool = self.spool
        if spool is None:
            store.write_atomic(relative, (self.meta, self.dataset))
        elif spool.meta == self.meta:
            if not store.has_room_for(0):
                raise OutOfSpaceError("free disk space below threshold")
            temp: Path = spool.finish()
            store.commit_temp(temp, relative)
            spool.forget_path()
        else:
            store.write_atomic(relative, _with_meta(self.meta, spool), size=self.size)


def _spooled_chunks(spool: DatasetSpool) -> Iterator[bytes]:
    with _spooled_dataset(spool) as fp:
        while chunk := fp.read(_COPY_CHUNK):
            yield chunk


def _with_meta(meta: bytes, spool: DatasetSpool) -> Iterator[bytes]:
    yield meta
    yield from _spooled_chunks(spool)
