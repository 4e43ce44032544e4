"""The called AE title must be ours (docs/conformance.md section 2), with real pynetdicom and dcmtk peers.

A sender configured with the wrong called AE title (another node's, a typo) must learn so at association
time — A-ASSOCIATE-RJ result 1 (permanent), source 1 (service user), reason 7 (called AE title not
recognised) — rather than have its images stored by a node it did not mean to send to.
"""

from __future__ import annotations

import re

from sqlalchemy import func, select
from structlog.testing import capture_logs

from tests.support.connections import associate, close, rejection
from tests.support.receiver import (
    dcmtk,
    instance_rows,
    receiver_settings,
    run_dcmtk,
    running_receiver,
    send,
    synthetic_series,
    wait_for,
)
from triaged.db.models import Association


def _association_rows(session_factory) -> int:
    with session_factory() as session:
        return int(session.scalar(select(func.count()).select_from(Association)) or 0)


def test_a_request_for_another_called_ae_is_rejected_permanently_and_takes_no_slot(
    tmp_path, make_settings, session_factory
):
    settings = receiver_settings(make_settings, dicom={"max_associations": 1})
    assert settings.dicom.require_called_ae_title  # the default, as the conformance statement says
    paths = synthetic_series(tmp_path / "src", 1)
    with running_receiver(settings, session_factory) as receiver, capture_logs() as logs:
        ae, wrong = associate(receiver.port, calling_ae="MODALITY", called_ae="OTHERNODE")
        try:
            assert rejection(wrong) == (0x01, 0x01, 0x07)
        finally:
            close(ae, wrong)
        assert receiver.admission.associations_in_use() == 0
        proc = run_dcmtk([dcmtk("echoscu"), "-aet", "MODALITY", "-aec", "TRIAGEX", "127.0.0.1", str(receiver.port)])
        assert proc.returncode != 0
        # dcmtk writes "Recognized", or "recognised" (3.6.7, on the CI machine of 2026-12-01)
        assert re.search(r"called ae title not recogni[sz]ed", proc.stderr + proc.stdout, re.IGNORECASE)
        # One slot (max_associations = 1) and still free: the right called AE title stores.
        assert [r.status for r in send(receiver, paths, calling_ae="MODALITY")] == [0]
    rejected = [e for e in logs if e["event"] == "association_rejected"]
    assert [(e["reason"], e["called_ae"], e["calling_ae"], e["transient"]) for e in rejected] == [
        ("called_ae_not_recognised", "OTHERNODE", "MODALITY", False),
        ("called_ae_not_recognised", "TRIAGEX", "MODALITY", False),
    ]
    assert _association_rows(session_factory) == 1  # only the accepted one is recorded
    assert len(instance_rows(session_factory)) == 1


def test_the_called_ae_check_can_be_switched_off(make_settings, session_factory):
    settings = receiver_settings(make_settings, dicom={"require_called_ae_title": False})
    with running_receiver(settings, session_factory) as receiver:
        ae, assoc = associate(receiver.port, called_ae="ANY-SCP")
        try:
            assert assoc.is_established
        finally:
            close(ae, assoc)
        wait_for(lambda: receiver.admission.associations_in_use() == 0)
