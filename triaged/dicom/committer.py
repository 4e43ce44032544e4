"""Group commit: one thread commits the rows of instances received on many associations in one transaction.

With SQLite every commit is an fsync under the single write lock, so concurrent associations would queue
behind each other's fsyncs. Here each handler writes its file durably on its own thread, hands its rows
to the committer and waits; whatever has queued up meanwhile is committed together, and every waiting
handler is released only after that commit returned. A failing batch is retried one instance at a time,
so one bad row never fails its neighbours.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from datetime import datetime

import structlog
from sqlalchemy.orm import Session, sessionmaker

from triaged.dicom.records import InstanceFacts, RecordOutcome, record_instance

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
    outcome: RecordOutcome | None = None
    error: BaseException | None = None


class GroupCommitter:
    """Commit instance rows in batches on one thread; :meth:`record` blocks until its batch committed."""

    def __init__(self, session_factory: sessionmaker[Session], *, max_batch: int = 64) -> None:
        self.session_factory = session_factory
        self.max_batch = max_batch
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

    def record(
        self,
        facts: InstanceFacts,
        *,
        file_path: str,
        size_bytes: int,
        sha256: str,
        calling_ae_title: str,
        association_id: int | None,
        now: datetime,
    ) -> RecordOutcome:
        """Commit the rows for one stored file; raise what the commit raised (e.g. SQLAlchemyError)."""
        pending = _Pending(facts, file_path, size_bytes, sha256, calling_ae_title, association_id, now)
        if self._thread is None:
            self._commit([pending])
        else:
            self._queue.put(pending)
            pending.done.wait()
        if pending.error is not None:
            raise pending.error
        assert pending.outcome is not None
        return pending.outcome

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
            with self.session_factory.begin() as session:
                outcomes = [
                    record_instance(
                        session,
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
