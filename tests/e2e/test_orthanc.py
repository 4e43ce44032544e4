"""Orthanc as the PACS, `triaged serve` as a subprocess: push a series, get SC/KOS/SR back in the same study.

Series are DICOM MR series built with write_mr_series from labelled ../shared/data slices and uploaded to
Orthanc through its REST API; Orthanc pushes them to triaged; triaged's outputs must arrive in Orthanc.
"""

from __future__ import annotations

import io
import json
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image
from sqlalchemy import select

from tests.conftest import shared_data
from tests.support.dicom_tools import dciodvfy_errors, tool
from tests.support.orthanc import Orthanc, orthanc_binary
from tests.support.pipeline_support import (
    SHIPPED_MODEL,
    UIH_T1,
    XA30_MPRAGE,
    kaggle_files,
    labelled_series,
    shipped_model_available,
    wait_for,
)
from tests.support.tcp_proxy import TcpProxy, running_proxy
from tests.support.triaged_daemon import TriagedDaemon
from triaged.db.models import (
    DestinationState,
    DestinationStatus,
    Job,
    JobKind,
    JobState,
    Output,
    Result,
    ResultStatus,
    Series,
    Study,
)
from triaged.errors import DicomPeerError
from triaged.outputs.dimse import Destination, SendOptions, send_files
from triaged.outputs.send import echo

pytestmark = [
    pytest.mark.orthanc,
]

SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
KOS_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"


@dataclass
class Stack:
    orthanc: Orthanc
    triaged: TriagedDaemon


@pytest.fixture
def random_model(tmp_path: Path) -> Path:
    from triaged.ml.registry import build_random_model_dir

    return build_random_model_dir(tmp_path / "model", seed=0)


def _stack(
    tmp_path: Path,
    model_dir: Path,
    *,
    quiet_seconds: float = 1.0,
    database_url: str | None = None,
    outputs: dict[str, Any] | None = None,
) -> Stack:
    orthanc_binary()
    orthanc = Orthanc(root=tmp_path / "orthanc", modalities={})
    triaged = TriagedDaemon(
        root=tmp_path / "triaged",
        model_dir=model_dir,
        peers={"orthanc": {"ae_title": orthanc.ae_title, "host": "127.0.0.1", "port": orthanc.dicom_port}},
        outputs={"destination": "orthanc", **(outputs or {})},
        quiet_seconds=quiet_seconds,
        database_url=database_url,
    )
    orthanc.modalities = {"triaged": ("TRIAGED", triaged.dicom_port)}
    return Stack(orthanc, triaged)


@pytest.fixture
def stack(tmp_path: Path, random_model: Path, db_url: str) -> Iterator[Stack]:
    """Orthanc and `triaged serve`, the daemon on a SQLite file or on the PostgreSQL server (``db_url``)."""
    yield from _running_stack(_stack(tmp_path, random_model, database_url=db_url))


def _running_stack(running: Stack) -> Iterator[Stack]:
    running.orthanc.start()
    try:
        running.triaged.start()
        try:
            yield running
        finally:
            running.triaged.stop()
    finally:
        running.orthanc.stop()


def _upload_series(orthanc: Orthanc, paths: list[Path]) -> tuple[str, str]:
    """Upload files; return (Orthanc series id, StudyInstanceUID)."""
    series_ids = set()
    for path in paths:
        reply = orthanc.post("/instances", path.read_bytes())
        series_ids.add(reply["ParentSeries"])
    assert len(series_ids) == 1
    series_id = series_ids.pop()
    study_id = orthanc.get(f"/series/{series_id}")["ParentStudy"]
    study_uid = orthanc.get(f"/studies/{study_id}")["MainDicomTags"]["StudyInstanceUID"]
    return series_id, study_uid


def _outputs_in(orthanc: Orthanc, study_uid: str) -> dict[str, list[dict[str, Any]]]:
    """Instances of the study grouped by SOP class, for our outputs only (SeriesNumber ≥ 9900)."""
    grouped: dict[str, list[dict[str, Any]]] = {SC_CLASS: [], KOS_CLASS: [], SR_CLASS: []}
    for instance in orthanc.study_instances(study_uid):
        tags = orthanc.instance_tags(instance["ID"])
        if tags.get("SOPClassUID") in grouped:
            grouped[tags["SOPClassUID"]].append({"ID": instance["ID"], **tags})
    return grouped


def _output_rows(stack: Stack, study_uid: str) -> list[Output]:
    with stack.triaged.session_factory() as session:
        query = (
            select(Output)
            .join(Result, Result.id == Output.result_id)
            .join(Series, Series.id == Result.series_id)
            .join(Study, Study.id == Series.study_id)
            .where(Study.study_instance_uid == study_uid)
            .order_by(Output.id)
        )
        rows = list(session.scalars(query))
        for row in rows:
            session.expunge(row)
        return rows


def _wait_outputs(stack: Stack, study_uid: str, *, timeout: float) -> dict[str, list[dict[str, Any]]]:
    """Wait until every output row of the daemon is sent and present in Orthanc."""
    deadline = time.monotonic() + timeout
    last: dict[str, list[dict[str, Any]]] = {}
    while time.monotonic() < deadline:
        rows = _output_rows(stack, study_uid)
        if rows and all(row.sent_at is not None for row in rows):
            last = _outputs_in(stack.orthanc, study_uid)
            if sum(len(v) for v in last.values()) >= len(rows):
                return last
        time.sleep(0.5)
    jobs = [(j.state, j.attempts, j.last_error) for j in stack.triaged.export_jobs()]
    raise AssertionError(f"outputs not in Orthanc within {timeout} s; jobs={jobs}\n{stack.triaged.log_tail()}")


def _coloured_fraction(png: bytes) -> float:
    """Fraction of strongly coloured pixels in the slice area (between banner and legend)."""
    with Image.open(io.BytesIO(png)) as image:
        rgb = np.asarray(image.convert("RGB"), dtype=np.int16)
    height = rgb.shape[0]
    body = rgb[int(height * 0.3) : int(height * 0.9)]
    chroma = body.max(axis=2) - body.min(axis=2)
    return float((chroma > 60).mean())


def test_outputs_arrive_in_the_source_study_and_render(stack: Stack, tmp_path: Path) -> None:
    files = kaggle_files("glioma")[:6]
    paths = labelled_series(tmp_path / "series", files, seed="orthanc-e2e", size=(256, 256))
    series_id, study_uid = _upload_series(stack.orthanc, paths)
    stack.orthanc.push("triaged", [series_id])
    outputs = _wait_outputs(stack, study_uid, timeout=120)
    scs, kos, sr = outputs[SC_CLASS], outputs[KOS_CLASS], outputs[SR_CLASS]
    assert scs and len(kos) == 1 and len(sr) == 1
    source_uids = {
        stack.orthanc.instance_tags(i)["SOPInstanceUID"] for i in stack.orthanc.get(f"/series/{series_id}")["Instances"]
    }
    for obj in [*scs, *kos, *sr]:
        assert obj["StudyInstanceUID"] == study_uid
        assert obj["SeriesDescription"].startswith(("AI TRIAGE URGENT:", "AI TRIAGE:"))
        assert obj["PatientID"] == "DEMO0001"
    for sc in scs:
        assert sc["Modality"] == "OT" and sc["BurnedInAnnotation"] == "YES"
        assert int(sc["SeriesNumber"]) == 9900
        assert sc["SourceImageSequence"][0]["ReferencedSOPInstanceUID"] in source_uids
        png = stack.orthanc.get_bytes(f"/instances/{sc['ID']}/preview")
        assert png.startswith(b"\x89PNG")
        assert _coloured_fraction(png) > 0.001, "no Grad-CAM colours in Orthanc's rendering"
    assert kos[0]["Modality"] == "KO" and sr[0]["Modality"] == "SR"
    _assert_orthanc_checks_the_called_ae(stack.orthanc)
    rows = _output_rows(stack, study_uid)
    assert {row.sop_instance_uid for row in rows} == {o["SOPInstanceUID"] for v in outputs.values() for o in v}
    # Each output row is marked sent as Orthanc acknowledges it; the job is finished in a commit after the last one.
    wait_for(
        lambda: all(job.state == JobState.DONE for job in stack.triaged.export_jobs()), timeout=30, what="export done"
    )


# The UIH T1: classic MR, '***' dates, every 5th slice. The XA30 MPRAGE: one Enhanced MR file (96 frames).
# The random model declares no scoring_plane, so both are scored as acquired (no axial reformat): every key
# image is an acquired slice, so each series gets SCs referencing it, a KOS and an SR.
REAL_SERIES = {"uih": UIH_T1, "xa30": XA30_MPRAGE}


@pytest.fixture
def all_outputs_stack(tmp_path: Path, random_model: Path) -> Iterator[Stack]:
    """Outputs for every assessed series (``mode = all``, stated even where it is the default)."""
    yield from _running_stack(_stack(tmp_path, random_model, outputs={"mode": "all"}))


@pytest.mark.slow
def test_real_series_through_orthanc_get_outputs_built_from_their_own_headers(
    all_outputs_stack: Stack, tmp_path: Path
) -> None:
    """Outputs on, real scanner series in: the SC/KOS/SR built from real (messy) headers arrive in Orthanc.

    The UIH T1 has StudyDate and other dates ``***`` (left out of the outputs); the XA30 MPRAGE is one
    Enhanced MR file, so its SCs reference a frame. What arrived is read back from Orthanc itself and must be
    valid for dciodvfy. The random model's scores mean nothing: ``outputs.mode = all`` builds outputs for
    every assessed series, urgent or not, and the objects must carry the decision the daemon stored.
    """
    tool("dciodvfy", "dicom3tools")
    stack = all_outputs_stack
    studies: dict[str, tuple[str, list[Path]]] = {}
    for name, folder in REAL_SERIES.items():
        paths = sorted((shared_data() / "dicom" / folder).iterdir())
        series_id, study_uid = _upload_series(stack.orthanc, paths)
        stack.orthanc.push("triaged", [series_id])
        studies[name] = (study_uid, paths)
    for name, (study_uid, paths) in studies.items():
        outputs = _wait_outputs(stack, study_uid, timeout=240)
        result = _result_of(stack, study_uid)
        assert result.status == ResultStatus.ASSESSED, (name, result.reason)
        scs, kos, sr = outputs[SC_CLASS], outputs[KOS_CLASS], outputs[SR_CLASS]
        assert scs and len(kos) == 1 and len(sr) == 1, name
        source = pydicom.dcmread(paths[0], stop_before_pixels=True)
        source_uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}
        prefix = "AI TRIAGE URGENT:" if result.urgent else "AI TRIAGE:"
        for obj in [*scs, *kos, *sr]:
            assert obj["StudyInstanceUID"] == study_uid and obj["PatientID"] == str(source.PatientID), name
            assert obj["SeriesDescription"].startswith(prefix), (name, obj["SeriesDescription"])
            if name == "uih":
                assert not obj.get("StudyDate"), "the source's '***' StudyDate reached an output"
        for sc in scs:
            reference = sc["SourceImageSequence"][0]
            assert reference["ReferencedSOPInstanceUID"] in source_uids, name
            if name == "xa30":
                assert 1 <= int(reference["ReferencedFrameNumber"]) <= int(source.NumberOfFrames)
            assert _coloured_fraction(stack.orthanc.get_bytes(f"/instances/{sc['ID']}/preview")) > 0.001
        for obj in [*scs, *kos, *sr]:
            path = tmp_path / "from-orthanc" / name / f"{obj['ID']}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(stack.orthanc.get_bytes(f"/instances/{obj['ID']}/file"))
            assert dciodvfy_errors(path) == [], (name, obj["Modality"])
    wait_for(
        lambda: all(job.state == JobState.DONE for job in stack.triaged.export_jobs()),
        timeout=60,
        what="exports done",
    )


def _result_of(stack: Stack, study_uid: str) -> Result:
    with stack.triaged.session_factory() as session:
        result = session.scalars(
            select(Result)
            .join(Series, Series.id == Result.series_id)
            .join(Study, Study.id == Series.study_id)
            .where(Study.study_instance_uid == study_uid)
        ).one()
        session.expunge(result)
        return result


def _assert_orthanc_checks_the_called_ae(orthanc: Orthanc) -> None:
    """Orthanc runs with DicomCheckCalledAet on, so outputs that arrived were addressed to its own AE title."""
    assert echo("127.0.0.1", orthanc.dicom_port, called_ae_title=orthanc.ae_title, calling_ae_title="TRIAGED") == 0
    wrong = "NOT" + orthanc.ae_title
    with pytest.raises(DicomPeerError):  # Orthanc 1.10 answers with an abort, so its log says why
        echo("127.0.0.1", orthanc.dicom_port, called_ae_title=wrong, calling_ae_title="TRIAGED")
    wait_for(
        lambda: f"bad called AET in the request ({wrong})" in orthanc.log_tail(100_000),
        timeout=30,
        what="Orthanc's called-AE rejection in its log",
    )


OLD_RETRY_BUDGET = 3  # export_max_attempts here: before destinations were state, the outage killed the job after this


def _proxied_stack(tmp_path: Path, model_dir: Path, **dicom: Any) -> Iterator[tuple[Stack, TcpProxy]]:
    """Orthanc behind a test-controlled TCP proxy on triaged's outbound path (Orthanc pushes to triaged directly)."""
    orthanc_binary()
    orthanc = Orthanc(root=tmp_path / "orthanc", modalities={})
    with running_proxy("127.0.0.1", orthanc.dicom_port) as proxy:
        triaged = TriagedDaemon(
            root=tmp_path / "triaged",
            model_dir=model_dir,
            peers={"orthanc": {"ae_title": orthanc.ae_title, "host": "127.0.0.1", "port": proxy.port}},
            outputs={"destination": "orthanc", "probe_base_seconds": 0.2, "probe_max_seconds": 0.5},
            worker={"export_max_attempts": OLD_RETRY_BUDGET, "export_count": 1},
            dicom=dicom,
        )
        orthanc.modalities = {"triaged": ("TRIAGED", triaged.dicom_port)}
        for running in _running_stack(Stack(orthanc, triaged)):
            yield running, proxy


@pytest.fixture
def outage_stack(tmp_path: Path, random_model: Path) -> Iterator[tuple[Stack, TcpProxy]]:
    yield from _proxied_stack(tmp_path, random_model)


@pytest.fixture
def hang_stack(tmp_path: Path, random_model: Path) -> Iterator[tuple[Stack, TcpProxy]]:
    """ACSE/DIMSE timeouts far longer than the test: a hung PACS stays hung until the test ends the hang."""
    yield from _proxied_stack(tmp_path, random_model, acse_timeout=600, dimse_timeout=600, network_timeout=600)


def _destination(stack: Stack, name: str = "orthanc") -> DestinationStatus | None:
    with stack.triaged.session_factory() as session:
        row = session.get(DestinationStatus, name)
        if row is not None:
            session.expunge(row)
        return row


def _export_job_of(stack: Stack, study_uid: str) -> Job | None:
    with stack.triaged.session_factory() as session:
        job = session.scalars(
            select(Job)
            .join(Series, Series.id == Job.series_id)
            .join(Study, Study.id == Series.study_id)
            .where(Job.kind == JobKind.EXPORT, Study.study_instance_uid == study_uid)
        ).first()
        if job is not None:
            session.expunge(job)
        return job


def _metrics(stack: Stack) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.triaged.http_port}/metrics", timeout=10) as response:
        return str(response.read().decode())


def _waiting(job: Job | None) -> bool:
    """Queued for the down destination with no attempt spent (fails at once if the export gave up instead)."""
    if job is not None and job.state in (JobState.DEAD, JobState.FAILED):
        raise AssertionError(f"export job {job.id} is {job.state} after {job.attempts} attempts: {job.last_error}")
    return job is not None and job.state == JobState.QUEUED and job.attempts == 0 and job.destination == "orthanc"


@pytest.mark.slow
def test_fault_pacs_down_then_back_every_output_arrives_once(
    outage_stack: tuple[Stack, TcpProxy], tmp_path: Path
) -> None:
    stack, proxy = outage_stack
    proxy.down()  # the outage starts before anything is due, and lasts exactly as long as this test says
    files = kaggle_files("meningioma")[:5]
    paths = labelled_series(tmp_path / "series", files, seed="orthanc-fault", size=(256, 256))
    series_id, study_uid = _upload_series(stack.orthanc, paths)
    stack.orthanc.push("triaged", [series_id])
    wait_for(lambda: _waiting(_export_job_of(stack, study_uid)), timeout=180, what="first export waiting")
    # Down for longer than the old retry budget would have lasted: counted in probes, not in seconds.
    wait_for(
        lambda: (_destination(stack) or DestinationStatus(probes=0)).probes >= 2 * OLD_RETRY_BUDGET,
        timeout=180,
        what=f"{2 * OLD_RETRY_BUDGET} probes of the down destination",
    )
    assert proxy.refused >= 1 + 2 * OLD_RETRY_BUDGET
    down = _destination(stack)
    assert down is not None and down.state == DestinationState.DOWN
    first = _export_job_of(stack, study_uid)
    assert _waiting(first), first and (first.state, first.attempts, first.last_error)
    assert first is not None and "DestinationDownError" in (first.last_error or "")
    assert len(stack.orthanc.study_instances(study_uid)) == len(paths)  # nothing got through
    # Visible to operators: /metrics says the destination is down with an export pending; `jobs list` says why.
    wait_for(
        lambda: (
            'triaged_destination_up{destination="orthanc"} 0.0' in _metrics(stack)
            and 'triaged_outputs_pending{destination="orthanc"} 1.0' in _metrics(stack)
        ),
        timeout=60,
        what="destination down in /metrics",
    )
    listed = stack.triaged.cli("jobs", "list", "--kind", "export", "--json")
    assert listed.returncode == 0, listed.stderr
    (row,) = json.loads(listed.stdout)
    assert (row["state"], row["attempts"], row["destination"]) == ("queued", 0, "orthanc")
    # The PACS being down blocks neither receiving nor inference: a second study is triaged meanwhile.
    other = labelled_series(tmp_path / "other", kaggle_files("glioma")[:3], seed="orthanc-fault-2", size=(256, 256))
    send_files(other, Destination("triaged", "TRIAGED", "127.0.0.1", stack.triaged.dicom_port), SendOptions("ORTHANC"))
    other_study = str(pydicom.dcmread(other[0], stop_before_pixels=True).StudyInstanceUID)
    wait_for(lambda: _waiting(_export_job_of(stack, other_study)), timeout=180, what="second export waiting")
    assert _waiting(_export_job_of(stack, study_uid))
    proxy.up()  # the outage ends now
    studies = {study_uid: len(paths), other_study: 0}  # the second study went to triaged only
    for uid in studies:
        _wait_outputs(stack, uid, timeout=180)
    wait_for(
        lambda: all(job.state == JobState.DONE for job in stack.triaged.export_jobs()), timeout=60, what="exports done"
    )
    jobs = stack.triaged.export_jobs()
    assert len(jobs) == 2 and all(job.attempts == 1 for job in jobs), [(j.state, j.attempts) for j in jobs]
    rows_by_result: dict[int, list[Output]] = {}
    for uid, sources in studies.items():
        rows = _output_rows(stack, uid)
        assert rows
        for row in rows:
            found = stack.orthanc.post(
                "/tools/find", {"Level": "Instance", "Query": {"SOPInstanceUID": row.sop_instance_uid}}
            )
            assert len(found) == 1, f"{row.kind} missing or duplicated"
            rows_by_result.setdefault(row.result_id, []).append(row)
        assert len(stack.orthanc.study_instances(uid)) == sources + len(rows)
    # Once up, the waiting exports flowed urgent first, then oldest first: one result's objects after the other's.
    expected = [j.payload["result_id"] for j in sorted(jobs, key=lambda j: (-j.priority, j.run_after, j.id))]
    earlier, later = (rows_by_result[result_id] for result_id in expected)
    assert max(r.sent_at for r in earlier if r.sent_at) <= min(r.sent_at for r in later if r.sent_at)
    # `triaged resend` sends the same instances again; Orthanc de-duplicates by SOP Instance UID.
    total = len(stack.orthanc.study_instances(study_uid))
    series_uid = stack.orthanc.get(f"/series/{series_id}")["MainDicomTags"]["SeriesInstanceUID"]
    resent = stack.triaged.cli("resend", series_uid)
    assert resent.returncode == 0, resent.stderr
    wait_for(
        lambda: (
            all(j.state == JobState.DONE for j in stack.triaged.export_jobs()) and len(stack.triaged.export_jobs()) >= 3
        ),
        timeout=60,
        what="resend done",
    )
    assert len(stack.orthanc.study_instances(study_uid)) == total


@pytest.mark.slow
def test_a_hung_pacs_never_blocks_inference(hang_stack: tuple[Stack, TcpProxy], tmp_path: Path) -> None:
    stack, proxy = hang_stack
    proxy.hang()  # accepts TCP, never answers: the export's association waits on its (long) timeout
    paths = labelled_series(tmp_path / "series", kaggle_files("meningioma")[:4], seed="orthanc-hang", size=(256, 256))
    series_id, study_uid = _upload_series(stack.orthanc, paths)
    stack.orthanc.push("triaged", [series_id])
    wait_for(
        lambda: (
            proxy.hung >= 1 and (job := _export_job_of(stack, study_uid)) is not None and job.state == JobState.RUNNING
        ),
        timeout=180,
        what="first export hanging on the PACS",
    )
    # While that export is stuck, a second series is received and assessed: inference has its own worker.
    other = labelled_series(tmp_path / "other", kaggle_files("glioma")[:3], seed="orthanc-hang-2", size=(256, 256))
    send_files(other, Destination("triaged", "TRIAGED", "127.0.0.1", stack.triaged.dicom_port), SendOptions("ORTHANC"))
    other_study = str(pydicom.dcmread(other[0], stop_before_pixels=True).StudyInstanceUID)
    wait_for(lambda: _export_job_of(stack, other_study) is not None, timeout=180, what="second series assessed")
    stuck = _export_job_of(stack, study_uid)
    assert stuck is not None and stuck.state == JobState.RUNNING and proxy.hung >= 1
    proxy.up()  # ends the hang: the stuck association is reset, the destination is down, probed, and up again
    for uid in (study_uid, other_study):
        _wait_outputs(stack, uid, timeout=180)
    wait_for(
        lambda: all(job.state == JobState.DONE for job in stack.triaged.export_jobs()), timeout=60, what="exports done"
    )
    assert [job.attempts for job in stack.triaged.export_jobs()] == [1, 1]
    for uid in (study_uid, other_study):
        for row in _output_rows(stack, uid):
            found = stack.orthanc.post(
                "/tools/find", {"Level": "Instance", "Query": {"SOPInstanceUID": row.sop_instance_uid}}
            )
            assert len(found) == 1, f"{row.kind} missing or duplicated"


@pytest.mark.slow
def test_shipped_model_labels_urgent_and_routine_series(tmp_path: Path) -> None:
    if not shipped_model_available():
        pytest.skip(f"needs the shipped model in {SHIPPED_MODEL}")
    running = _stack(tmp_path, SHIPPED_MODEL)
    running.orthanc.start()
    try:
        running.triaged.start(timeout=240)
        try:
            cases = {"glioma": kaggle_files("glioma")[:8], "notumor": kaggle_files("notumor")[:8]}
            studies = {}
            for label, files in cases.items():
                paths = labelled_series(tmp_path / label, files, seed=f"label-{label}", size=(256, 256))
                series_id, study_uid = _upload_series(running.orthanc, paths)
                running.orthanc.push("triaged", [series_id])
                studies[label] = study_uid
            for label, study_uid in studies.items():
                outputs = _wait_outputs(running, study_uid, timeout=240)
                result = _result_of(running, study_uid)
                # Expected from the input, not from the result: glioma slices urgent, normal slices routine.
                assert result.status == ResultStatus.ASSESSED, (label, result.reason)
                assert result.label == label, (label, result.probabilities)
                assert result.urgent == (label == "glioma"), (label, result.urgency, result.threshold)
                expected = "AI TRIAGE URGENT:" if label == "glioma" else "AI TRIAGE:"
                descriptions = [o["SeriesDescription"] for v in outputs.values() for o in v]
                assert descriptions and all(d.startswith(expected) for d in descriptions), (label, descriptions)
        finally:
            running.triaged.stop()
    finally:
        running.orthanc.stop()
