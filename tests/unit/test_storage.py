"""InstanceStore: atomic durable writes, safe paths, free-space threshold, crash leftovers."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from triaged.errors import OutOfSpaceError, StoreError
from triaged.receive.storage import TEMP_DIR_NAME, TEMP_SUFFIX, InstanceStore


def test_write_atomic_writes_chunks_and_fanout_dirs_exist(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path / "s", 0)
    assert (tmp_path / "s" / "00").is_dir() and (tmp_path / "s" / "ff").is_dir()
    path = store.write_atomic("ab/x.dcm", (b"head", b"body"))
    assert path == store.root / "ab" / "x.dcm"
    assert path.read_bytes() == b"headbody"
    assert store.write_atomic("deep/er/y.npy", b"1").read_bytes() == b"1"  # new directories are created
    assert list((store.root / TEMP_DIR_NAME).iterdir()) == []


@pytest.mark.parametrize("relative", ["", "/etc/passwd", "../x", "a/../../x", "a/./b", ".tmp/x", "a\\b", "a//b"])
def test_unsafe_relative_paths_are_refused(tmp_path: Path, relative: str) -> None:
    store = InstanceStore(tmp_path, 0)
    with pytest.raises(ValueError):
        store.path_for(relative)
    with pytest.raises(ValueError):
        store.write_atomic(relative, b"x")


def test_threshold_refuses_before_writing(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path, 0)
    store.min_free_bytes = store.free_bytes() + (1 << 30)
    with pytest.raises(OutOfSpaceError):
        store.write_atomic("ab/x.dcm", b"data")
    assert not store.exists("ab/x.dcm")
    assert list((store.root / TEMP_DIR_NAME).iterdir()) == []
    assert not store.has_room_for(0)


def test_io_error_leaves_no_temp_file(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path, 0)
    (store.root / "ab" / "x.dcm").mkdir()  # rename onto a directory fails
    with pytest.raises(StoreError):
        store.write_atomic("ab/x.dcm", b"data")
    assert list((store.root / TEMP_DIR_NAME).iterdir()) == []


def test_cleanup_removes_temp_files_of_dead_processes_only(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path, 0)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    dead_pid = int(dead.stdout)
    temp = store.root / TEMP_DIR_NAME
    (temp / f"{dead_pid}.1.0{TEMP_SUFFIX}").write_bytes(b"half")
    (temp / f"{os.getpid()}.1.0{TEMP_SUFFIX}").write_bytes(b"mine, in flight")
    (temp / f"garbage{TEMP_SUFFIX}").write_bytes(b"?")
    assert store.cleanup_stale_temp_files() == 2
    assert [p.name for p in temp.iterdir()] == [f"{os.getpid()}.1.0{TEMP_SUFFIX}"]


def test_concurrent_writers_never_share_a_temp_file(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path, 0)

    def write(index: int) -> None:
        for j in range(20):
            store.write_atomic(f"{index:02x}/{j}.bin", bytes([index]) * 1000)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index in range(8):
        for j in range(20):
            assert store.path_for(f"{index:02x}/{j}.bin").read_bytes() == bytes([index]) * 1000
