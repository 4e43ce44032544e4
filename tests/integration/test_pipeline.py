"""The infer pipeline in-process: real receiver (C-STORE over loopback), real SQLite/PostgreSQL, real model dir.

Series are received by the real :class:`Receiver`; the infer job is enqueued here (the daemon's series
sweep does that in production, see tests/e2e) and run through a real :class:`Worker`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from tests.conftest import shared_data
from tests.support.pipeline_support import (
    TOSHIBA_DWI,
    XA30_MPRAGE,
    count,
    jobs_for,
    kaggle_files,
    labelled_series,
    results_for,
)
from tests.support.receiver import running_receiver, send
from triaged.config import Settings
from triaged.db import queue, repo
from triaged.db.models import Job, JobKind, JobState, Result, ResultStatus, Series, SeriesState, SlicePrediction
from triaged.receive.storage import InstanceStore
from triaged.runtime import Runtime
from triaged.worker import Worker

# torch/monai are imported lazily (inside fixtures) so that this filter covers their import-time warnings.
pytestmark = [
    pytest.mark.filterwarnings("ignore:The pixel data is .* bytes long:UserWarning"),
]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from triaged.ml.api import build_random_model_dir

    root = tmp_path_factory.mktemp("models")
    return build_random_model_dir(root / "a", seed=0), build_random_model_dir(root / "b", seed=1)


@pytest.fixture
def settings(make_settings: Callable[..., Settings], db_url: str, model_dirs: tuple[Path, Path]) -> Settings:
    return make_settings(
        database={"url": db_url},
        storage={"min_free_bytes": 0},
        dicom={"bind_address": "127.0.0.1", "port": 1},
        model={"directory": model_dirs[0], "device": "cpu", "precision": "fp32", "cam_top_k": 2},
        outputs={"mode": "all"},
        worker={"heartbeat_seconds": 0.5, "lease_seconds": 30},
        notify={"ris": {"port": 2575}},  # never contacted here: only the enqueued job is checked
    )


@pytest.fixture
def runtime(settings: Settings, session_factory: sessionmaker[Session]) -> Runtime:
    from triaged.ml.api import Triage

    triage = Triage(settings.model.directory, device="cpu", precision="fp32", threads=1)
    return Runtime(settings, session_factory, InstanceStore(settings.storage_dir, 0), triage)


@pytest.fixture
def receive(settings: Settings, session_factory: sessionmaker[Session]) -> Iterator[Callable[[list[Path]], str]]:
    with running_receiver(settings, session_factory) as receiver:

        def _send(paths: list[Path]) -> str:
            results = send(receiver, paths)
            assert all(r.status == 0 for r in results), results
            return str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)

        yield _send


def _enqueue(session_factory: sessionmaker[Session], series_uid: str) -> int:
    with session_factory.begin() as session:
        series = repo.series_by_uid(session, series_uid)
        series.state = SeriesState.QUEUED
        job = queue.enqueue(
            session,
            JobKind.INFER,
            dedupe_key=f"infer:{series.id}:{series.generation}",
            series_id=series.id,
            generation=series.generation,
        )
        assert job is not None
        return job.id


def _run_next(runtime: Runtime, worker_id: str = "w-test") -> JobState:
    job = queue.claim(runtime.session_factory, worker_id=worker_id, kinds=[JobKind.INFER], lease_seconds=30)
    assert job is not None
    return Worker(runtime, worker_id=worker_id, stop=threading.Event(), kinds=[JobKind.INFER]).run_job(job)


def _series(session_factory: sessionmaker[Session], uid: str) -> Series:
    with session_factory() as session:
        return repo.series_by_uid(session, uid)


def test_labelled_series_gets_one_result_with_cams(
    runtime: Runtime, receive: Callable[[list[Path]], str], tmp_path: Path, model_dirs: tuple[Path, Path]
) -> None:
    files = kaggle_files("glioma")[:3] + kaggle_files("notumor")[:2]
    paths = labelled_series(tmp_path / "s1", files, seed="pipeline-1")
    uid = receive(paths)
    job_id = _enqueue(runtime.session_factory, uid)
    assert _run_next(runtime) == JobState.DONE

    [result] = results_for(runtime.session_factory, uid)
    assert result.job_id == job_id
    assert result.model_sha256 == runtime.triage.weights_sha256  # type: ignore[union-attr]
    # a T1 post-contrast axial series of in-distribution slices: the gate must let it through
    assert result.status == ResultStatus.ASSESSED, result.reason
    assert result.label in runtime.triage.classes  # type: ignore[union-attr]
    assert set(result.probabilities) == set(runtime.triage.classes)  # type: ignore[union-attr]
    assert sum(result.probabilities.values()) == pytest.approx(1.0, abs=1e-4)
    assert result.urgency is not None and result.threshold is not None
    assert result.urgent == (result.urgency >= result.threshold)
    for step in ("decode", "preprocess", "inference", "db", "total"):
        assert result.timings[step] >= 0
    with runtime.session_factory() as session:
        slices = list(
            session.scalars(
                select(SlicePrediction).where(SlicePrediction.result_id == result.id).order_by("slice_index")
            )
        )
        series = session.get(Series, result.series_id)
        assert series is not None and series.state == SeriesState.DONE
        exports = list(session.scalars(select(Job).where(Job.kind == JobKind.EXPORT)))
    assert len(slices) == 5
    sop_uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths]
    assert [s.sop_instance_uid for s in slices] == sop_uids  # synthetic positions ascend with file order
    assert all(s.frame_number is None for s in slices)
    keyed = [s for s in slices if s.cam_path]
    assert 1 <= len(keyed) <= 2  # cam_top_k = 2
    for s in keyed:
        assert s.is_key
        cam = np.load(runtime.store.path_for(s.cam_path))  # type: ignore[arg-type]
        assert cam.dtype == np.float32
        assert cam.shape == pydicom.dcmread(paths[s.slice_index]).pixel_array.shape
        assert np.isfinite(cam).all()
    # outputs.mode = all: one export job for the result, committed with it, and one worklist notification
    notifications = [e for e in exports if "notify" in e.payload]
    exports = [e for e in exports if "notify" not in e.payload]
    assert [e.payload for e in exports] == [{"result_id": result.id}]
    assert exports[0].dedupe_key == f"export:{result.id}"
    assert exports[0].priority == (10 if result.urgent else 0)
    assert [(n.payload, n.dedupe_key) for n in notifications] == [
        ({"result_id": result.id, "notify": "ris"}, f"notify:ris:{result.id}")
    ]


def test_reprocess_same_model_is_idempotent_other_model_adds_result(
    runtime: Runtime, receive: Callable[[list[Path]], str], tmp_path: Path, model_dirs: tuple[Path, Path]
) -> None:
    uid = receive(labelled_series(tmp_path / "s", kaggle_files("pituitary")[:3], seed="pipeline-2"))
    _enqueue(runtime.session_factory, uid)
    assert _run_next(runtime) == JobState.DONE
    with runtime.session_factory.begin() as session:
        series = repo.series_by_uid(session, uid)
        assert len(repo.enqueue_reprocess(session, [series], model_dir=None, max_attempts=3)) == 1
    assert _run_next(runtime) == JobState.DONE
    assert len(results_for(runtime.session_factory, uid)) == 1  # same (series, generation, model): no duplicate
    assert _series(runtime.session_factory, uid).state == SeriesState.DONE  # not left `queued`
    with runtime.session_factory.begin() as session:
        series = repo.series_by_uid(session, uid)
        repo.enqueue_reprocess(session, [series], model_dir=str(model_dirs[1]), max_attempts=3)
    assert _run_next(runtime) == JobState.DONE
    first, second = results_for(runtime.session_factory, uid)
    assert first.model_sha256 != second.model_sha256
    assert first.generation == second.generation == 1
    assert _series(runtime.session_factory, uid).state == SeriesState.DONE


def test_corrupt_pixels_fail_permanently_others_continue(
    runtime: Runtime, receive: Callable[[list[Path]], str], tmp_path: Path
) -> None:
    paths = labelled_series(tmp_path / "bad", kaggle_files("meningioma")[:2], seed="pipeline-bad")
    ds = pydicom.dcmread(paths[1])
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]  # truncated pixel data; the receiver never decodes
    ds.save_as(paths[1])
    bad_uid = receive(paths)
    good_uid = receive(labelled_series(tmp_path / "good", kaggle_files("notumor")[:2], seed="pipeline-good"))
    _enqueue(runtime.session_factory, bad_uid)
    _enqueue(runtime.session_factory, good_uid)
    states = sorted([_run_next(runtime), _run_next(runtime)])
    assert states == sorted([JobState.FAILED, JobState.DONE])
    [bad_job] = jobs_for(runtime.session_factory, bad_uid)
    assert bad_job.state == JobState.FAILED
    assert bad_job.attempts == 1  # permanent: no retry
    assert bad_job.last_error is not None
    assert bad_job.last_error.startswith("PixelDecodeError: instance 2: pixel data cannot be decoded")
    bad = _series(runtime.session_factory, bad_uid)
    assert bad.state == SeriesState.FAILED and bad.skip_reason == bad_job.last_error
    assert results_for(runtime.session_factory, bad_uid) == []
    assert len(results_for(runtime.session_factory, good_uid)) == 1


def test_dwi_series_is_not_assessable(runtime: Runtime, receive: Callable[[list[Path]], str]) -> None:
    paths = sorted((shared_data() / "dicom" / TOSHIBA_DWI).iterdir())
    uid = receive(paths)
    _enqueue(runtime.session_factory, uid)
    assert _run_next(runtime) == JobState.DONE
    [result] = results_for(runtime.session_factory, uid)
    assert result.status == ResultStatus.NOT_ASSESSABLE
    assert result.urgent is False and result.urgency is None and result.label is None
    assert result.reason and "EPI" in result.reason
    assert _series(runtime.session_factory, uid).skip_reason == result.reason
    # outputs.not_assessable = "none": no export job for it
    assert count(runtime.session_factory, Job, Job.kind == JobKind.EXPORT) == 0


def test_enhanced_mr_frames_become_slice_predictions(runtime: Runtime, receive: Callable[[list[Path]], str]) -> None:
    paths = sorted((shared_data() / "dicom" / XA30_MPRAGE).iterdir())
    uid = receive(paths)
    _enqueue(runtime.session_factory, uid)
    assert _run_next(runtime) == JobState.DONE
    [result] = results_for(runtime.session_factory, uid)
    assert result.status == ResultStatus.ASSESSED, result.reason  # a T1 MPRAGE: the gate must let it through
    assert result.label is not None and result.urgency is not None
    with runtime.session_factory() as session:
        slices = list(session.scalars(select(SlicePrediction).where(SlicePrediction.result_id == result.id)))
    assert len(slices) == 96
    assert {s.sop_instance_uid for s in slices} == {
        str(pydicom.dcmread(paths[0], stop_before_pixels=True).SOPInstanceUID)
    }
    assert sorted(s.frame_number or 0 for s in slices) == list(range(1, 97))
    keyed = [s for s in slices if s.cam_path]
    assert 1 <= len(keyed) <= 2 and all(s.is_key for s in keyed)  # cam_top_k = 2
    for s in keyed:
        assert np.load(runtime.store.path_for(s.cam_path)).shape == (128, 128)  # type: ignore[arg-type]


def test_undecodable_mosaic_the_gate_refuses_is_not_assessable(
    runtime: Runtime, receive: Callable[[list[Path]], str]
) -> None:
    """A Siemens mosaic cannot be decoded into slices, but its metadata says EPI: not_assessable, not failed."""
    paths = sorted((shared_data() / "dicom" / "neurolabusc_dcm_qa/In/Orientation/axmb/AxInt36mb").iterdir())
    uid = receive(paths)
    _enqueue(runtime.session_factory, uid)
    assert _run_next(runtime) == JobState.DONE
    [result] = results_for(runtime.session_factory, uid)
    assert result.status == ResultStatus.NOT_ASSESSABLE and not result.urgent
    assert result.reason is not None and result.reason.startswith("EPI")  # the gate reads ScanningSequence EP
    assert result.timings["decode"] >= 0
    assert _series(runtime.session_factory, uid).state == SeriesState.DONE


def test_lost_lease_rolls_back_results(runtime: Runtime, receive: Callable[[list[Path]], str], tmp_path: Path) -> None:
    uid = receive(labelled_series(tmp_path / "s", kaggle_files("glioma")[:2], seed="pipeline-lease"))
    job_id = _enqueue(runtime.session_factory, uid)
    job = queue.claim(runtime.session_factory, worker_id="slow", kinds=[JobKind.INFER], lease_seconds=30)
    assert job is not None
    # the lease is taken over while "slow" is still working (as if it had stalled past lease expiry)
    with runtime.session_factory.begin() as session:
        session.execute(update(Job).where(Job.id == job_id).values(lease_owner="other"))
    from triaged.pipeline import run_infer_job

    with pytest.raises(queue.LeaseLostError):
        run_infer_job(runtime, job)
    assert count(runtime.session_factory, Result) == 0
    assert count(runtime.session_factory, Job, Job.kind == JobKind.EXPORT) == 0
