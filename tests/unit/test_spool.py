"""DatasetSpool: memory up to the threshold, then the store's temp dir; overflow and a full disk drop the file."""

from __future__ import annotations

import errno
import hashlib

import pytest

from triaged.receive.spool import DatasetSpool
from triaged.receive.storage import InstanceStore


@pytest.fixture
def store(tmp_path):
    return InstanceStore(tmp_path / "storage", 0)


def _temp_files(store: InstanceStore) -> list:
    return list((store.root / ".tmp").iterdir())


def test_small_data_sets_stay_in_memory(store):
    spool = DatasetSpool(store, threshold=10, max_bytes=100, meta=b"META")
    spool.write(b"12345")
    spool.write(b"67890")
    assert not spool.spooled and spool.getvalue() == b"1234567890"
    assert _temp_files(store) == []


def test_beyond_the_threshold_the_meta_and_every_byte_go_to_the_temp_dir_hashed(store):
    spool = DatasetSpool(store, threshold=4, max_bytes=100, meta=b"META")
    for chunk in (b"abc", b"defg", b"hij"):
        spool.write(chunk)
    assert spool.spooled and spool.size == 10
    path = spool.finish()
    assert path.parent == store.root / ".tmp"
    assert path.read_bytes() == b"METAabcdefghij"
    assert spool.sha256_hex() == hashlib.sha256(b"METAabcdefghij").hexdigest()
    assert spool.getvalue() == b""  # nothing in memory (pynetdicom's logging handler asks)
    spool.discard()
    assert _temp_files(store) == []


def test_overflow_removes_the_file_at_once_and_keeps_counting(store):
    spool = DatasetSpool(store, threshold=4, max_bytes=8, meta=b"")
    spool.write(b"123456")
    assert len(_temp_files(store)) == 1
    spool.write(b"789")
    assert spool.overflow and _temp_files(store) == []
    spool.write(b"more")
    assert spool.size == 13 and spool.path is None


def test_below_the_free_space_threshold_nothing_is_written(tmp_path):
    store = InstanceStore(tmp_path / "storage", 1 << 62)
    spool = DatasetSpool(store, threshold=2, max_bytes=100, meta=b"")
    spool.write(b"12345")
    assert spool.error is not None and spool.error.errno == errno.ENOSPC
    assert _temp_files(store) == []
