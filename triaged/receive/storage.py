"""Durable, immutable file store under one root (design: Receiving, durable acknowledge).

A write goes to a temp file in ``<root>/.tmp`` (same filesystem, so the rename is atomic), is fsynced,
renamed into place and the directory is fsynced: after :meth:`InstanceStore.write_atomic` returns, the
file survives a crash or power loss. Readers never see a partial file. Files are immutable once
written; a new version of an object gets a new relative path.
"""

from __future__ import annotations

import errno
import itertools
import os
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

import structlog

from triaged.errors import OutOfSpaceError, StoreError

log = structlog.get_logger()

TEMP_DIR_NAME = ".tmp"
TEMP_SUFFIX = ".part"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class InstanceStore:
    """Atomic durable writes of immutable files below ``root``; refuses writes below ``min_free_bytes``."""

    def __init__(self, root: Path, min_free_bytes: int) -> None:
        if min_free_bytes < 0:
            raise ValueError("min_free_bytes must be >= 0")
        self.root = Path(root).resolve()
        self.min_free_bytes = min_free_bytes
        self._temp_dir = self.root / TEMP_DIR_NAME
        self._temp_dir.mkdir(parents=True, exist_ok=True)
        self._known_dirs: set[Path] = {self.root}
        self._counter = itertools.count()
        self._lock = threading.Lock()
        self._create_fanout_dirs()

    def _create_fanout_dirs(self) -> None:
        """Create the 256 ``00``..``ff`` directories of :func:`~triaged.dicom.uids.uid_path` once, durably."""
        created = False
        for index in range(256):
            directory = self.root / f"{index:02x}"
            if not directory.is_dir():
                directory.mkdir(exist_ok=True)
                created = True
            self._known_dirs.add(directory)
        if created:
            _fsync_dir(self.root)

    def path_for(self, relative: str) -> Path:
        """Absolute path of ``relative``; raises ValueError for anything that could escape the root."""
        parts = relative.split("/")
        if any(p in ("", ".", "..") for p in parts) or "\\" in relative or "\x00" in relative:
            raise ValueError(f"not a safe relative storage path: {relative!r}")
        if parts[0] == TEMP_DIR_NAME:
            raise ValueError("the temp directory is not a storage path")
        return self.root.joinpath(*parts)

    def free_bytes(self) -> int:
        """Bytes available to unprivileged writers on the storage filesystem."""
        stats = os.statvfs(self.root)
        return stats.f_bavail * stats.f_frsize

    def has_room_for(self, size: int) -> bool:
        """Whether writing ``size`` bytes keeps free space at or above the threshold."""
        return self.free_bytes() - size >= self.min_free_bytes

    def exists(self, relative: str) -> bool:
        return self.path_for(relative).is_file()

    def write_atomic(
        self, relative: str, data: bytes | Sequence[bytes] | Iterable[bytes], *, size: int | None = None
    ) -> Path:
        """Write ``data`` (bytes or chunks) durably to ``relative`` and return its path.

        Chunks may come from a generator (a large file copied piecewise); then pass ``size`` for the free
        space check. Raises :class:`OutOfSpaceError` before writing anything when the threshold would be
        crossed (or when the disk fills while writing), and :class:`StoreError` on other I/O errors; in
        both cases no temp file and no target file is left behind by this call. Writing identical content
        to an existing path is allowed (atomic replace).
        """
        self.path_for(relative)  # refuse an unsafe path before touching the disk
        chunks: Iterable[bytes | bytearray | memoryview]
        if isinstance(data, bytes | bytearray | memoryview):
            chunks = [data]
        elif size is None:
            chunks = list(data)
        else:
            chunks = data
        if size is None:
            size = sum(len(c) for c in chunks)
        self._check_room(size)
        temp, fd = self.open_temp()
        try:
            try:
                _write_all(fd, chunks)
                os.fsync(fd)
            finally:
                os.close(fd)
            return self.commit_temp(temp, relative)
        except OSError as exc:
            temp.unlink(missing_ok=True)
            raise _store_error(relative, exc) from exc

    def open_temp(self) -> tuple[Path, int]:
        """A new temp file in the store's temp directory (same filesystem), open for writing: ``(path, fd)``.

        Its name starts with our pid, so :meth:`cleanup_stale_temp_files` removes it if we crash.
        """
        temp = self._temp_dir / f"{os.getpid()}.{threading.get_ident()}.{next(self._counter)}{TEMP_SUFFIX}"
        return temp, os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)

    def commit_temp(self, temp: Path, relative: str) -> Path:
        """Rename a complete, fsynced temp file into place at ``relative`` and fsync its directory.

        Raises :class:`StoreError` (the temp file is then removed).
        """
        target = self.path_for(relative)
        try:
            self._ensure_dir(target.parent)
            os.rename(temp, target)
            _fsync_dir(target.parent)
        except OSError as exc:
            temp.unlink(missing_ok=True)
            raise _store_error(relative, exc) from exc
        return target

    def _check_room(self, size: int) -> None:
        if not self.has_room_for(size):
            raise OutOfSpaceError(f"free disk space below threshold ({self.min_free_bytes} bytes) on {self.root}")

    def remove(self, relative: str) -> None:
        """Remove a file that no committed row points to (cleanup after a failed commit)."""
        path = self.path_for(relative)
        try:
            path.unlink(missing_ok=True)
            _fsync_dir(path.parent)
        except OSError as exc:
            log.warning("store_remove_failed", path=relative, error=str(exc))

    def cleanup_stale_temp_files(self) -> int:
        """Delete temp files left by processes that no longer run (a crash mid-write); return how many."""
        removed = 0
        for temp in self._temp_dir.glob(f"*{TEMP_SUFFIX}"):
            pid_text = temp.name.split(".", 1)[0]
            if pid_text.isdigit() and int(pid_text) != os.getpid() and _pid_alive(int(pid_text)):
                continue
            if pid_text.isdigit() and int(pid_text) == os.getpid():
                continue
            temp.unlink(missing_ok=True)
            removed += 1
        if removed:
            _fsync_dir(self._temp_dir)
            log.info("store_temp_files_removed", count=removed)
        return removed

    def _ensure_dir(self, directory: Path) -> None:
        """Create ``directory`` (and parents) durably: each new entry's parent is fsynced."""
        if directory in self._known_dirs:
            return
        with self._lock:
            missing: list[Path] = []
            current = directory
            while current not in self._known_dirs and not current.is_dir():
                missing.append(current)
                current = current.parent
            for path in reversed(missing):
                path.mkdir(exist_ok=True)
                _fsync_dir(path.parent)
            self._known_dirs.add(directory)


def _store_error(relative: str, exc: OSError) -> StoreError:
    """ENOSPC/EDQUOT (the disk filled while writing) is out of space, like the threshold; the rest I/O errors."""
    message = f"could not store {relative}: {exc.strerror or exc}"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutOfSpaceError(message)
    return StoreError(message)


def _write_all(fd: int, chunks: Iterable[bytes | bytearray | memoryview]) -> None:
    for chunk in chunks:
        view = memoryview(chunk)
        while view:
            written = os.write(fd, view)
            view = view[written:]
