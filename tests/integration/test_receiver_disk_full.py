"""A storage filesystem that really fills up (issue 12 item 5): a 6 MiB tmpfs as the storage directory.

``min_free_bytes = 0``, so only the kernel's ENOSPC stops a write. Every C-STORE is either answered 0x0000
with its file complete on disk and its row committed, or 0xA700 (out of resources) with no file and no
row; once space is freed the same receiver stores again, without a restart. Both receive paths are
filled: data sets held in memory (small) and data sets received to disk as they arrive (spooled).
"""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from tests.support.large_instance import write_large_enhanced_mr
from tests.support.receiver import instance_rows, receiver_settings, running_receiver, send, synthetic_series
from triaged.receive import status
from triaged.receive.storage import TEMP_DIR_NAME

MIB = 1 << 20


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 6 MiB tmpfs mounted for the test (needs root, as in CI)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a 6 MiB tmpfs as the storage directory")
    mount = tmp_path / "storage"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m,mode=0755", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def _check_every_answer(settings, session_factory, answers: dict[str, int]) -> None:
    """0x0000 ⇔ a row whose file is complete; 0xA700 ⇔ neither file nor row; no temp file left."""
    rows = {r.sop_instance_uid: r for r in instance_rows(session_factory)}
    for uid, code in answers.items():
        assert code in (status.SUCCESS, status.OUT_OF_RESOURCES), hex(code)
        if code == status.SUCCESS:
            data = (settings.storage_dir / rows[uid].file_path).read_bytes()
            assert hashlib.sha256(data).hexdigest() == rows[uid].sha256 and len(data) == rows[uid].size_bytes
        else:
            assert uid not in rows
    stored_files = {p.name for p in settings.storage_dir.glob("??/**/*.dcm")}
    assert stored_files == {Path(r.file_path).name for r in rows.values()}
    assert list((settings.storage_dir / TEMP_DIR_NAME).iterdir()) == []


def test_a_full_disk_answers_a700_keeps_every_acknowledged_instance_and_recovers(
    tmp_path, small_filesystem, make_settings, session_factory
):
    settings = receiver_settings(
        make_settings,
        storage={"directory": str(small_filesystem), "min_free_bytes": 0},
        dicom={"spool_threshold_bytes": 256 * 1024},
    )
    small = synthetic_series(tmp_path / "small", 8, size=256)  # ~128 KiB each: held in memory
    spooled = [write_large_enhanced_mr(tmp_path / f"spooled{i}.dcm", 1, seed=str(i)) for i in range(2)]
    with running_receiver(settings, session_factory) as receiver, capture_logs() as logs:
        # Leave 600 KiB: a spooled 1 MiB data set starts (256 KiB fit) and meets the kernel's ENOSPC mid-way.
        filler = small_filesystem / "filler"
        filler.write_bytes(b"\0" * (receiver.store.free_bytes() - 600 * 1024))
        first = send(receiver, spooled[:1] + small)
        codes = [r.status for r in first]
        assert codes[0] == status.OUT_OF_RESOURCES
        (spool_failed,) = [e for e in logs if e["event"] == "store_spool_failed"]
        assert spool_failed["error"] == os.strerror(errno.ENOSPC)  # the real thing, not our threshold
        assert status.SUCCESS in codes[1:], "no small instance fitted: the test measures nothing"
        assert status.OUT_OF_RESOURCES in codes[1:], "every small instance fitted: the disk never filled"
        answers = {r.sop_instance_uid: int(r.status or 0) for r in first}
        _check_every_answer(settings, session_factory, answers)

        filler.unlink()  # space freed: the same receiver, not restarted, stores the rest
        rest = [r.path for r in first if r.status != status.SUCCESS] + spooled[1:]
        again = send(receiver, rest)
        assert [r.status for r in again] == [status.SUCCESS] * len(rest)
        answers.update({r.sop_instance_uid: int(r.status or 0) for r in again})
        _check_every_answer(settings, session_factory, answers)
    assert len(instance_rows(session_factory)) == len(small) + len(spooled)
