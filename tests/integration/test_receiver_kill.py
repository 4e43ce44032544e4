"""Crash safety: SIGKILL the receiver mid-send; every acknowledged instance survives, nothing half-written remains."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
from pynetdicom import AE
from sqlalchemy import select

from tests.support.receiver import spawn_receiver
from triaged.db import audit
from triaged.db.models import Association, AuditEvent, Instance
from triaged.dicom.synthetic import write_mr_series
from triaged.outputs.send import close_socket, read_dicom_file
from triaged.receive.storage import TEMP_DIR_NAME

pytestmark = pytest.mark.slow

N_INSTANCES = 500


def _start(overrides: dict[str, object], workdir: Path, name: str) -> tuple[subprocess.Popen[bytes], int]:
    return spawn_receiver(overrides, workdir, name)


def _send_until_dead(port: int, paths: list[Path], kill_after: int, proc: subprocess.Popen[bytes]) -> list[str]:
    """Send all paths on one association; SIGKILL the receiver after ``kill_after`` acks. Return acked UIDs."""
    files = [read_dicom_file(p) for p in paths]
    ae = AE(ae_title="CRASHSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(files[0].sop_class_uid, files[0].transfer_syntax_uid)
    assoc = ae.associate("127.0.0.1", port, ae_title="TRIAGED")
    assert assoc.is_established
    acked: list[str] = []
    killer: threading.Thread | None = None
    for item in files:
        if not assoc.is_established:
            break
        rsp = assoc.send_c_store(item.path)
        if rsp.get("Status") == 0:
            acked.append(item.sop_instance_uid)
        if len(acked) == kill_after and killer is None:
            # Kill from another thread while the next C-STOREs are in flight.
            killer = threading.Thread(target=proc.send_signal, args=(signal.SIGKILL,))
            killer.start()
    if killer is not None:
        killer.join()
    if assoc.is_established:
        assoc.abort()
    close_socket(assoc)  # pynetdicom keeps a dead requestor's socket open
    ae.shutdown()
    return acked


def test_sigkill_mid_send_loses_no_acknowledged_instance(tmp_path, db_url, engine, session_factory):
    rng = np.random.default_rng(0)
    paths = write_mr_series([rng.random((64, 64)) for _ in range(N_INSTANCES)], tmp_path / "src", seed=11)
    overrides: dict[str, object] = {
        "data_dir": str(tmp_path / "data"),
        "database": {"url": db_url},
        "storage": {"min_free_bytes": 0},
        "dicom": {"bind_address": "127.0.0.1", "ae_title": "TRIAGED"},
    }
    proc, port = _start(overrides, tmp_path, "first")
    try:
        acked = _send_until_dead(port, paths, kill_after=int(rng.integers(100, 300)), proc=proc)
    finally:
        proc.kill()
        proc.wait(30)
    assert 100 <= len(acked) < N_INSTANCES
    storage = tmp_path / "data" / "storage"

    # Restart on the same database and storage: stale associations are closed, temp files removed.
    proc, port = _start(overrides, tmp_path, "second")
    try:
        with session_factory() as session:
            rows = {i.sop_instance_uid: i for i in session.scalars(select(Instance))}
            associations = list(session.scalars(select(Association)))
        assert set(acked) <= set(rows), "an acknowledged instance is missing from the database"
        for row in rows.values():
            data = (storage / row.file_path).read_bytes()  # no row without its file
            assert hashlib.sha256(data).hexdigest() == row.sha256
            assert len(data) == row.size_bytes
        assert list((storage / TEMP_DIR_NAME).iterdir()) == []
        assert associations and all(a.closed_at is not None for a in associations)
        # The crashed receiver never wrote its instances_stored record: the restart's close is the audit trail.
        with session_factory() as session:
            closed = list(session.scalars(select(AuditEvent).where(AuditEvent.kind == audit.ASSOCIATION_CLOSED)))
        assert [(e.outcome, e.reason, e.actor) for e in closed] == [("restarted", "receiver_restarted", "receiver")]
        assert closed[0].detail["stored"] == sum(1 for r in rows.values() if r.association_id == associations[0].id)
        # The sender retries everything: the store completes with one row per instance.
        files = [read_dicom_file(p) for p in paths]
        ae = AE(ae_title="CRASHSCU")
        ae.add_requested_context(files[0].sop_class_uid, files[0].transfer_syntax_uid)
        assoc = ae.associate("127.0.0.1", port, ae_title="TRIAGED")
        assert all(assoc.send_c_store(f.path).Status == 0 for f in files)
        assoc.release()
    finally:
        proc.terminate()
        proc.wait(30)
    with session_factory() as session:
        assert len(session.scalars(select(Instance)).all()) == N_INSTANCES
