"""Counted slots (associations, connections per peer address) that one receiver or a pool of them shares.

Why a table in shared memory: with ``dicom.receiver_processes`` = N the kernel spreads connections over N
processes (``SO_REUSEPORT``), so a limit that each process enforces on its own admits up to N times its
share wherever the connections happen to land. Here every process counts what it holds in its own row of
one array, and an acquire compares the *sum over all rows* with the limit, under a lock that excludes the
other threads of this process and the other processes. Rows, not one shared counter, so the parent can
zero the row of a child that died (its connections died with it) without knowing what it held.

The cross-process lock is ``flock`` on a small file: the kernel drops it when its holder dies, so a child
killed inside the (microseconds long) critical section cannot leave the others waiting forever, as a
``multiprocessing.Lock`` held by a killed process would.
"""

from __future__ import annotations

import contextlib
import fcntl
import multiprocessing
import os
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: Bucket 0 counts associations; the others count open connections per peer address (hashed).
ASSOCIATION_BUCKET = 0
#: Hash buckets for peer addresses. Two addresses in one bucket share its limit (stricter, never looser);
#: with 65 535 buckets, 100 peers collide with a probability of about 7 %, 20 peers of about 0.3 %.
ADDRESS_BUCKETS = 65_535


def address_bucket(address: str) -> int:
    """The bucket of a peer address: the same in every process (``hash()`` is salted per process)."""
    return 1 + zlib.crc32(address.encode("utf-8", "replace")) % ADDRESS_BUCKETS


def new_counts(processes: int, ctx: Any = None) -> Any:
    """A zeroed shared ``int`` array for :class:`SlotTable` (``ctx``: the multiprocessing context of the pool)."""
    context = ctx if ctx is not None else multiprocessing
    return context.RawArray("i", processes * (ADDRESS_BUCKETS + 1))


class SlotTable:
    """One process's view of the shared counts: acquire and release in its own row, limits over all rows.

    Parameters
    ----------
    counts
        From :func:`new_counts`, shared with the other processes (or private to one receiver).
    processes
        Number of rows in ``counts``.
    index
        This process's row.
    lock_path
        File to ``flock`` when other processes share ``counts``; ``None`` when only this process uses it.
    """

    def __init__(self, counts: Any, processes: int, index: int = 0, lock_path: Path | None = None) -> None:
        if not 0 <= index < processes:
            raise ValueError(f"index {index} is outside 0..{processes - 1}")
        if len(counts) != processes * (ADDRESS_BUCKETS + 1):
            raise ValueError("counts does not have one row per process")
        self._counts = counts
        self._processes = processes
        self._row = index * (ADDRESS_BUCKETS + 1)
        self._thread_lock = threading.Lock()
        self._lock_fd: int | None = None
        if lock_path is not None:
            self._lock_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    @classmethod
    def private(cls) -> SlotTable:
        """A table for a single receiver process."""
        return cls(new_counts(1), 1)

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._thread_lock:
            if self._lock_fd is None:
                yield
                return
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _total(self, bucket: int) -> int:
        stride = ADDRESS_BUCKETS + 1
        return sum(int(self._counts[p * stride + bucket]) for p in range(self._processes))

    def try_acquire(self, bucket: int, limit: int) -> bool:
        """Take one slot of ``bucket`` if fewer than ``limit`` are held over all processes."""
        with self._locked():
            if self._total(bucket) >= limit:
                return False
            self._counts[self._row + bucket] += 1
            return True

    def release(self, bucket: int) -> None:
        """Give back one slot of ``bucket`` that this process took."""
        with self._locked():
            if self._counts[self._row + bucket] <= 0:
                raise RuntimeError(f"slot bucket {bucket} released more often than acquired")
            self._counts[self._row + bucket] -= 1

    def total(self, bucket: int) -> int:
        """Slots of ``bucket`` held over all processes right now."""
        with self._locked():
            return self._total(bucket)

    def reset_row(self, index: int) -> None:
        """Zero the row of process ``index`` (the pool's parent, for a child that died)."""
        stride = ADDRESS_BUCKETS + 1
        with self._locked():
            for offset in range(index * stride, (index + 1) * stride):
                self._counts[offset] = 0
