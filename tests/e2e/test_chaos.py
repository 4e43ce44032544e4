"""A short chaos run (issue 12 item 4): a few SIGKILLs of the receiver, a worker and an exporter mid-traffic.

The long run (≥ 50 kills) is ``benchmarks/chaos.py``; this one uses the same loop with a seed whose four
kills hit all three kinds of process. Correctness is read from the database and from what Orthanc received,
after waiting for every job to reach a final state, never from timings.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage
from sqlalchemy.orm import Session, sessionmaker

from benchmarks.chaos import VICTIMS, _count, run_chaos
from tests.support.orthanc import orthanc_binary
from triaged.db.models import (
    Instance,
    Job,
    JobKind,
    JobState,
    Output,
    OutputKind,
    Result,
    ResultStatus,
    Series,
    Study,
    utcnow,
)
from triaged.receive.storage import InstanceStore

SEED = 2  # kills, in order: receiver, worker, exporter, worker


@pytest.mark.slow
@pytest.mark.orthanc
@pytest.mark.postgres
def test_kill_9_of_any_process_loses_no_acknowledged_instance_and_duplicates_no_result(
    tmp_path: Path, postgres_url: str
) -> None:
    orthanc_binary()  # skip (fail in CI) without Orthanc
    counts = run_chaos(tmp_path, database=postgres_url, kills=4, seed=SEED, series=4, kill_gap=(1.0, 3.0), log=False)
    assert counts.failures() == [], counts
    assert set(counts.kills) == set(VICTIMS) and sum(counts.kills.values()) == 4
    assert counts.acknowledged == 4 * 3  # the sender resent until every instance was answered 0x0000
    assert counts.results >= 4 and counts.outputs > 0
    assert (counts.lost, counts.duplicate_results, counts.sent_not_received, counts.stuck) == (0, 0, 0, 0)


def test_the_counts_see_a_lost_instance_a_duplicate_result_and_an_undelivered_output(
    tmp_path: Path, session_factory: sessionmaker[Session]
) -> None:
    """The verdict can fail: each must-be-0 count is non-zero when its fault is planted."""
    with session_factory.begin() as session:
        study = Study(study_instance_uid="1.2.3")
        series = Series(study=study, series_instance_uid="1.2.3.4", calling_ae_title="CHAOSSCU")
        session.add_all([study, series])
        session.flush()
        session.add(
            Instance(
                series_id=series.id,
                sop_instance_uid="1.2.3.4.1",
                sop_class_uid=MRImageStorage,
                transfer_syntax_uid=ExplicitVRLittleEndian,
                file_path="missing.dcm",
                size_bytes=1,
                sha256="0" * 64,
            )
        )
        results = [
            Result(
                series_id=series.id,
                generation=1,
                model_name="m",
                model_version="1",
                model_sha256=sha * 64,
                status=ResultStatus.ASSESSED,
            )
            for sha in "ab"
        ]
        session.add_all(results)
        session.flush()
        session.add(
            Output(
                result_id=results[0].id,
                kind=OutputKind.STRUCTURED_REPORT,
                sop_class_uid="1.2.840.10008.5.1.4.1.1.88.22",
                sop_instance_uid="2.25.1",
                series_instance_uid="2.25.2",
                file_path="outputs/sr.dcm",
                sent_at=utcnow(),
            )
        )
        session.add(Job(kind=JobKind.EXPORT, state=JobState.RUNNING, dedupe_key="stuck", payload={}))
    store = InstanceStore(tmp_path / "store", 0)
    counts = _count(session_factory, store, {"1.2.3.4.1", "1.2.3.4.2"}, ["2.25.9", "2.25.9"])
    assert (counts["lost"], counts["duplicate_results"], counts["sent_not_received"]) == (2, 1, 1)
    assert (counts["stuck"], counts["delivered_twice"]) == (1, 1)
