"""Admission and the slot table: limits over all processes' rows, tickets released once, RJ fields."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from triaged.receive.admission import ASSOCIATION_LIMIT, UNKNOWN_CALLED_AE, UNKNOWN_CALLING_AE, Admission
from triaged.receive.slots import ADDRESS_BUCKETS, ASSOCIATION_BUCKET, SlotTable, address_bucket, new_counts


def _views(tmp_path: Path, processes: int) -> list[SlotTable]:
    """One table per "process": the same shared array and lock file, each with its own row."""
    counts = new_counts(processes, multiprocessing.get_context("spawn"))
    lock = tmp_path / "slots.lock"
    return [SlotTable(counts, processes, index, lock) for index in range(processes)]


def test_a_limit_holds_over_the_rows_of_all_processes(tmp_path):
    tables = _views(tmp_path, 3)
    taken = [tables[i % 3].try_acquire(ASSOCIATION_BUCKET, 16) for i in range(20)]
    assert taken == [True] * 16 + [False] * 4  # not ceil(16 / 3) = 6 per process, 18 in total
    assert all(t.total(ASSOCIATION_BUCKET) == 16 for t in tables)
    tables[2].release(ASSOCIATION_BUCKET)
    assert tables[0].try_acquire(ASSOCIATION_BUCKET, 16)
    assert not tables[1].try_acquire(ASSOCIATION_BUCKET, 16)


def test_zeroing_a_dead_processs_row_frees_what_it_held(tmp_path):
    tables = _views(tmp_path, 2)
    for _ in range(3):
        assert tables[1].try_acquire(ASSOCIATION_BUCKET, 4)
    assert tables[0].try_acquire(ASSOCIATION_BUCKET, 4)
    assert not tables[0].try_acquire(ASSOCIATION_BUCKET, 4)
    tables[0].reset_row(1)
    assert tables[0].total(ASSOCIATION_BUCKET) == 1


def test_releasing_more_than_was_taken_is_a_bug_not_a_negative_count():
    table = SlotTable.private()
    with pytest.raises(RuntimeError, match="released more often"):
        table.release(ASSOCIATION_BUCKET)


def test_address_buckets_are_stable_and_never_the_association_bucket():
    assert address_bucket("10.0.0.5") == address_bucket("10.0.0.5")
    buckets = {address_bucket(f"10.0.{i // 256}.{i % 256}") for i in range(2000)}
    assert ASSOCIATION_BUCKET not in buckets
    assert all(1 <= b <= ADDRESS_BUCKETS for b in buckets)
    assert len(buckets) > 1900  # spread, not a handful of buckets


def test_connections_per_address_and_association_slots_are_separate():
    admission = Admission(SlotTable.private(), max_associations=1, max_connections_per_address=2)
    first = admission.open_connection("10.0.0.5")
    second = admission.open_connection("10.0.0.5")
    assert first is not None and second is not None
    assert admission.open_connection("10.0.0.5") is None
    assert admission.open_connection("10.0.0.6") is not None  # another address has its own count
    assert admission.associations_in_use() == 0  # connections alone hold no association slot
    assert admission.request_association(first, "ANY") is None
    assert admission.request_association(second, "ANY") is ASSOCIATION_LIMIT
    admission.close_connection(first)
    admission.close_connection(first)  # idempotent
    assert admission.associations_in_use() == 0
    assert admission.connections_from("10.0.0.5") == 1
    assert admission.request_association(second, "ANY") is None


def test_unknown_calling_ae_is_refused_before_a_slot_is_taken():
    admission = Admission(
        SlotTable.private(), max_associations=4, max_connections_per_address=4, allowed_calling_ae_titles=["PACS "]
    )
    ticket = admission.open_connection("10.0.0.5")
    assert ticket is not None
    assert admission.request_association(ticket, "STRANGER") is UNKNOWN_CALLING_AE
    assert admission.associations_in_use() == 0
    assert admission.request_association(ticket, "PACS") is None


def test_rejection_fields_are_those_of_ps3_8():
    # PS3.8 9.3.4: result 1 permanent / 2 transient; source 1 user, 3 provider (presentation).
    assert (ASSOCIATION_LIMIT.result, ASSOCIATION_LIMIT.source, ASSOCIATION_LIMIT.diagnostic) == (2, 3, 2)
    assert (UNKNOWN_CALLING_AE.result, UNKNOWN_CALLING_AE.source, UNKNOWN_CALLING_AE.diagnostic) == (1, 1, 3)


def test_defaults_leave_room_for_a_site_with_many_modalities():
    """Issue 12: at least 32 associations by default; ARTIM short (10 s, was the 30 s ACSE timeout)."""
    from triaged.config import DicomSettings

    dicom = DicomSettings()
    assert dicom.max_associations >= 32
    assert dicom.max_connections_per_address >= dicom.max_associations  # one busy PACS may use every slot
    assert dicom.artim_timeout == 10


def test_called_ae_title_is_checked_before_the_calling_one_and_takes_no_slot():
    admission = Admission(
        SlotTable.private(),
        max_associations=1,
        max_connections_per_address=2,
        allowed_calling_ae_titles=["KNOWN"],
        called_ae_title="TRIAGED ",
    )
    ticket = admission.open_connection("10.0.0.7")
    assert ticket is not None
    assert admission.request_association(ticket, "STRANGER", "OTHER") is UNKNOWN_CALLED_AE
    assert admission.request_association(ticket, "STRANGER", "TRIAGED") is UNKNOWN_CALLING_AE
    assert admission.associations_in_use() == 0
    assert admission.request_association(ticket, "KNOWN", "TRIAGED  ") is None
    assert admission.associations_in_use() == 1
    assert (UNKNOWN_CALLED_AE.result, UNKNOWN_CALLED_AE.source, UNKNOWN_CALLED_AE.diagnostic) == (1, 1, 7)
