"""Huge instances in bounded memory (issue 12 item 2): received to disk as they arrive, or refused cleanly.

The memory test runs the receiver in its own process and reads its peak resident set (``VmHWM`` in
``/proc/<pid>/status``) after three 512 MiB enhanced multi-frame MR instances arrived at once on three
associations; held in memory as pynetdicom does by default, that is ≥ 1.5 GiB above the baseline.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
from pathlib import Path

import pytest
from sqlalchemy import select
from structlog.testing import capture_logs

from tests.support.connections import real_request, recv_exactly
from tests.support.large_instance import dataset_sha256, write_large_enhanced_mr
from tests.support.receiver import (
    dcmtk,
    instance_rows,
    meta_end,
    receiver_settings,
    run_dcmtk,
    running_receiver,
    send,
    spawn_receiver,
    synthetic_series,
    wait_for,
)
from triaged.db.engine import make_engine, make_session_factory
from triaged.db.models import Instance
from triaged.db.schema import upgrade
from triaged.receive import status
from triaged.receive.storage import TEMP_DIR_NAME

MIB = 1 << 20
INSTANCE_MIB = 512
SENDERS = 3
#: Peak RSS above the idle receiver's may grow by at most this for all SENDERS instances together
#: (measured 30 MiB; 1541 MiB with spooling off): per association the in-memory part (spool threshold
#: 8 MiB) plus a few 1 MiB PDUs.
PEAK_GROWTH_BOUND = 160 * MIB


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


def _temp_files(storage: Path) -> list[Path]:
    return list((storage / TEMP_DIR_NAME).iterdir())


@pytest.mark.slow
def test_three_512_mib_instances_at_once_stay_in_bounded_memory_and_arrive_byte_identical(tmp_path, sqlite_url):
    storescu = dcmtk("storescu")
    engine = make_engine(sqlite_url)
    upgrade(engine)
    overrides: dict[str, object] = {
        "data_dir": str(tmp_path / "data"),
        "database": {"url": sqlite_url},
        "storage": {"min_free_bytes": 0},
        "dicom": {"bind_address": "127.0.0.1", "ae_title": "TRIAGED"},
    }
    sources = [write_large_enhanced_mr(tmp_path / f"big{i}.dcm", INSTANCE_MIB, seed=str(i)) for i in range(SENDERS)]
    small = synthetic_series(tmp_path / "small", 1)
    proc, port = spawn_receiver(overrides, tmp_path, "large")
    try:
        warm = run_dcmtk([storescu, "-aet", "WARM", "-aec", "TRIAGED", "127.0.0.1", str(port), str(small[0])])
        assert warm.returncode == 0, warm.stderr
        baseline = _status_kib(proc.pid, "VmRSS") * 1024
        env = {**os.environ, "TCP_NODELAY": "1"}
        senders = [
            subprocess.Popen(
                [storescu, "-aet", f"BIG{i}", "-aec", "TRIAGED", "127.0.0.1", str(port), str(path)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            for i, path in enumerate(sources)
        ]
        outputs = [s.communicate(timeout=1200)[0].decode(errors="replace") for s in senders]
        assert [s.returncode for s in senders] == [0] * SENDERS, outputs
        peak = _status_kib(proc.pid, "VmHWM") * 1024
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(60)
    growth = peak - baseline
    print(
        f"receiver peak RSS growth {growth / MIB:.0f} MiB for {SENDERS} x {INSTANCE_MIB} MiB",
        f"(baseline {baseline / MIB:.0f} MiB)",
    )
    assert growth < PEAK_GROWTH_BOUND, f"peak RSS grew by {growth / MIB:.0f} MiB"
    storage = tmp_path / "data" / "storage"
    with make_session_factory(engine)() as session:
        rows = {r.sop_instance_uid: r for r in session.scalars(select(Instance)) if r.size_bytes > MIB}
    assert len(rows) == SENDERS
    for source in sources:
        (row,) = [r for r in rows.values() if r.sop_instance_uid in source.read_bytes()[:4096].decode("latin-1")]
        stored = storage / row.file_path
        assert dataset_sha256(stored, meta_end(stored)) == dataset_sha256(source, meta_end(source))
        assert dataset_sha256(stored, 0) == row.sha256 and stored.stat().st_size == row.size_bytes
    assert _temp_files(storage) == []
    engine.dispose()


def test_an_instance_over_the_limit_is_refused_and_a_spooled_one_stored(tmp_path, make_settings, session_factory):
    """max 6 MiB, spooled beyond 1 MiB: 8 MiB → 0xA702 and nothing kept; 3 MiB (spooled) and a small one stored,
    on the same association, byte-identical."""
    settings = receiver_settings(
        make_settings, dicom={"max_instance_bytes": 6 * MIB, "spool_threshold_bytes": MIB, "max_pdu_size": 64 * 1024}
    )
    too_big = write_large_enhanced_mr(tmp_path / "too_big.dcm", 8, seed="big")
    spooled = write_large_enhanced_mr(tmp_path / "spooled.dcm", 3, seed="spooled")
    small = synthetic_series(tmp_path / "small", 1)[0]
    with running_receiver(settings, session_factory) as receiver, capture_logs() as logs:
        results = send(receiver, [too_big, spooled, small])
        assert [r.status for r in results] == [status.INSTANCE_TOO_LARGE, 0, 0]
        wait_for(lambda: any(e["event"] == "store_rejected" for e in logs))
    (rejected,) = [e for e in logs if e["event"] == "store_rejected"]
    assert rejected["reason"] == "instance_too_large"
    (to_disk,) = [e for e in logs if e["event"] == "store_received_to_disk"]  # the 3 MiB one, not the small one
    assert to_disk["size_bytes"] > 3 * MIB
    rows = instance_rows(session_factory)
    assert len(rows) == 2
    stored = {r.sop_instance_uid: settings.storage_dir / r.file_path for r in rows}
    for path in (spooled, small):
        (target,) = [p for uid, p in stored.items() if uid in path.read_bytes()[:4096].decode("latin-1")]
        assert dataset_sha256(target, meta_end(target)) == dataset_sha256(path, meta_end(path))
        assert hashlib.sha256(target.read_bytes()).hexdigest() in {r.sha256 for r in rows}
    assert _temp_files(settings.storage_dir) == []


def test_a_pdu_longer_than_advertised_closes_the_connection_before_its_body_is_read(
    tmp_path, make_settings, session_factory
):
    """pynetdicom would read a PDU whole, whatever its length field says (here 256 MiB): bounded memory
    needs the connection closed instead."""
    settings = receiver_settings(make_settings, dicom={"max_pdu_size": 64 * 1024})
    with running_receiver(settings, session_factory) as receiver, capture_logs() as logs:
        with socket.socket() as sock:
            sock.settimeout(60)
            sock.connect(("127.0.0.1", receiver.port))
            sock.sendall(real_request())
            header = recv_exactly(sock, 6)
            assert header[0] == 0x02  # A-ASSOCIATE-AC
            recv_exactly(sock, int.from_bytes(header[2:6], "big"))
            sock.sendall(b"\x04\x00" + (256 * MIB).to_bytes(4, "big") + b"\x00" * 1024)
            while sock.recv(65536):  # until the receiver closes (no body is read, so no A-ABORT is owed)
                pass
        wait_for(lambda: receiver.admission.associations_in_use() == 0, timeout=60)
        assert [r.status for r in send(receiver, synthetic_series(tmp_path / "after", 1))] == [0]
    (too_large,) = [e for e in logs if e["event"] == "pdu_too_large"]
    assert too_large["length"] == 256 * MIB and too_large["limit"] == MIB + 16
