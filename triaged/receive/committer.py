"""Group commit: one thread commits the rows of instances received on many associations in one transaction.

With SQLite every commit is an fsync under the single write lock, so concurrent associations would queue
behind each other's fsyncs. Here each handler hands its rows to the committer, writes its file durably on its
own thread and waits; whatever has queued up meanwhile is committed together, and every waiting handler is
released only after that commit returned. A failing batch is retried one instance at a time, so one bad row
never fails its neighbours.

Pipelined (:meth:`GroupCommitter.submit`): the committer runs a batch's statements while the handlers are
still fsyncing their files, and issues COMMIT only once every file of the batch is durable, so the order the
design requires (file durable, then row committed, then success) holds while the statements' cost hides
behind the fsyncs. An item whose file could not be written is withdrawn and the rest of its batch retried.
On SQLite the batch holds the write lock while it waits, so only small files are pipelined (the caller
decides; see :data:`triaged.receive.ingest.PIPELINE_MAX_BYTES`) and the wait is bounded by ``settle_timeout``.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from datetime import datetime

import structlog
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from triaged.receive.records import InstanceFacts, RecordOutcome, record_instance

log = structlog.get_logger()


@dataclass
class _Pending:
    facts: InstanceFacts
    file_path: str
    size_bytes: int
    sha256: str
    calling_ae_title: str
    association_id: int | None
    now: datetime
    done: threading.Event = field(default_factory=threading.Event)
    prepared: threading.Event = field(default_factory=threading.Event)
    file_settled: threading.Event = field(default_factory=threading.Event)
    withdrawn: bool = False
    outcome: RecordOutcome | None = None
    error: BaseException | None = None


class _WithdrawnError(Exception):
    """Internal: a batch item's file was not written; the batch is rolled back and redone without it."""


class PendingRecord:
    """Handle of one submitted record: say whether its file is durable, then wait for the commit."""

    def __init__(self, committer: GroupCommitter, pending: _Pending) -> None:
        self._committer = committer
        self._pending = pending

    def file_durable(self) -> RecordOutcome:
        """The file is on disk for good: let the row commit, wait for it, and return the outcome.

        Raises what the commit raised (e.g. ``SQLAlchemyError``).
        """
        pending = self._pending
        pending.file_settled.set()
        if self._committer._thread is None:
            self._committer._commit([pending])
        else:
            pending.done.wait()
        if pending.error is not None:
            raise pending.error
        assert pending.outcome is not None
        return pending.outcome

    def wait_prepared(self, timeout: float | None = None) -> bool:
        """Wait until the committer has run this record's statements and waits for its file before COMMIT.

        For tests and diagnostics of the pipelined order (file durable, then row committed): from this point
        the row is written but not visible to any other connection. Returns False if ``timeout`` passed first.
        """
        return self._pending.prepared.wait(timeout)

    def withdraw(self) -> None:
        """The file could not be written: the row must not be committed."""
        self._pending.withdrawn = True
        self._pending.file_settled.set()


class GroupCommitter:
    """Commit instance rows in batches on one thread; :meth:`PendingRecord.file_durable` waits for its batch."""

    def __init__(
        self, session_factory: sessionmaker[Session], *, max_batch: int = 64, settle_timeout: float = 30.0
    ) -> None:
        # Rows are written on a plain Core connection: an ORM session's bookkeeping cost more CPU than the
        # statements themselves (profiled: 4 associations spent ~40 % of the receiver's GIL time in it).
        bind = session_factory.kw.get("bind")
        if not isinstance(bind, Engine):
            raise TypeError("GroupCommitter needs a session factory bound to an Engine")
        self._engine: Engine = bind
        self.max_batch = max_batch
        self.settle_timeout = settle_timeout
        self._queue: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        # (series id, association id) links already committed: skips one INSERT per instance.
        self._linked: set[tuple[int, int]] = set()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="triaged-group-commit", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(30)
            self._thread = None

    def submit(
        self,
        facts: InstanceFacts,
        *,
        file_path: str,
        size_bytes: int,
        sha256: str,
        calling_ae_title: str,
        association_id: int | None,
        now: datetime,
    ) -> PendingRecord:
        """Queue the rows for a file about to be written; the caller then reports the write's result.

        Every submitted record must be settled with :meth:`PendingRecord.file_durable` or
        :meth:`PendingRecord.withdraw`: its batch waits for that before committing.
        """
        pending = _Pending(facts, file_path, size_bytes, sha256, calling_ae_title, association_id, now)
        if self._thread is not None:
            self._queue.put(pending)
        return PendingRecord(self, pending)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            stopping = False
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            self._commit(batch)
            if stopping:
                return

    def _commit(self, batch: list[_Pending]) -> None:
        try:
            with self._engine.begin() as connection:
                outcomes = [
                    record_instance(
                        connection,
                        p.facts,
                        file_path=p.file_path,
                        size_bytes=p.size_bytes,
                        sha256=p.sha256,
                        calling_ae_title=p.calling_ae_title,
                        association_id=p.association_id,
                        now=p.now,
                        linked=self._linked,
                    )
                    for p in batch
                ]
                for pending in batch:
                    pending.prepared.set()
                for pending in batch:  # COMMIT only once every file of the batch is durable
                    if not pending.file_settled.wait(self.settle_timeout):
                        log.error("group_commit_file_never_settled", timeout_s=self.settle_timeout)
                        pending.error = TimeoutError("the instance file was not settled in time")
                        pending.withdrawn = True
                    if pending.withdrawn:
                        raise _WithdrawnError
        except _WithdrawnError:
            kept = [p for p in batch if not p.withdrawn]
            for pending in batch:
                if pending.withdrawn:
                    pending.done.set()
            if kept:
                self._commit(kept)
            return
        except Exception as exc:  # handed to the waiting handler, which answers a failure status
            if len(batch) > 1:
                log.warning("group_commit_retry_singly", size=len(batch), error=type(exc).__name__)
                for pending in batch:
                    self._commit([pending])
                return
            batch[0].error = exc
            batch[0].done.set()
            return
        if len(self._linked) > 100_000:
            self._linked.clear()
        for pending, outcome in zip(batch, outcomes, strict=True):
            if pending.association_id is not None:
                self._linked.add((outcome.series_id, pending.association_id))
            pending.outcome = outcome
            pending.done.set()
