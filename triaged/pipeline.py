"""Process one ``infer`` job end to end: the only place where DICOM, the model and the database meet.

Slow work (decoding, inference, Grad-CAM, writing the maps) happens outside any transaction so SQLite's
single writer lock stays free for the receiver. The results, the slice predictions, the export jobs, the
series state and the job completion then commit in ONE short transaction (design: Queue): a crash can
never leave results without a finished job or the reverse. Idempotent per (series, generation, model
sha256): a duplicate job finds the existing result and just completes.
"""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import structlog
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from triaged import metrics
from triaged.config import Settings
from triaged.db import queue
from triaged.db.models import (
    URGENT_EXPORT_PRIORITY,
    Instance,
    Job,
    JobKind,
    Result,
    ResultStatus,
    Series,
    SeriesState,
    SlicePrediction,
    Study,
    utcnow,
)
from triaged.dicom.pixels import (
    DecodedSeries,
    DecodedSlice,
    SeriesHeader,
    decode_series,
    read_series_header,
    shared_orientation,
)
from triaged.errors import JobError, PixelDecodeError
from triaged.log import uid_hash
from triaged.ml.api import SeriesAssessment, SeriesMeta, Triage
from triaged.ml.gate import gate_reason
from triaged.ml.registry import NO_TUMOUR
from triaged.ml.results import SliceGeometry
from triaged.notify import notify_targets
from triaged.runtime import Runtime

log = structlog.get_logger()


@dataclass(frozen=True)
class _SeriesInput:
    series_id: int
    series_instance_uid: str
    study_instance_uid: str
    generation: int
    current_generation: int
    modality: str
    files: tuple[tuple[str, Path], ...]  # (sop_instance_uid, absolute path)


def slice_geometry(slices: Sequence[DecodedSlice]) -> SliceGeometry | None:
    """Where the decoded slices lie, when every slice says so and all share one orientation and spacing."""
    orientation = shared_orientation(slices)
    spacings = {s.pixel_spacing for s in slices}
    spacing = next(iter(spacings)) if len(spacings) == 1 else None
    if orientation is None or spacing is None:
        return None
    return SliceGeometry(
        orientation=orientation,
        positions=tuple(s.position for s in slices if s.position is not None),  # all of them: shared_orientation
        pixel_spacing=spacing,
    )


def series_meta(header: SeriesHeader, number_of_slices: int, geometry: SliceGeometry | None = None) -> SeriesMeta:
    return SeriesMeta(
        modality=header.modality,
        body_part_examined=header.body_part_examined,
        series_description=header.series_description,
        protocol_name=header.protocol_name,
        image_type=header.image_type,
        scanning_sequence=header.scanning_sequence,
        sequence_variant=header.sequence_variant,
        diffusion_b_values=header.diffusion_b_values,
        number_of_slices=number_of_slices,
        echo_time=header.echo_time,
        repetition_time=header.repetition_time,
        inversion_time=header.inversion_time,
        geometry=geometry,
    )


def should_export(settings: Settings, result: Result) -> bool:
    mode = settings.outputs.mode
    if mode == "none":
        return False
    if result.status == ResultStatus.NOT_ASSESSABLE:
        return mode == "all" and settings.outputs.not_assessable != "none"
    return mode == "all" or result.urgent


def _load_input(runtime: Runtime, job: Job) -> _SeriesInput:
    if job.series_id is None:
        raise JobError(f"infer job {job.id} names no series")
    with runtime.session_factory() as session:
        series = session.get(Series, job.series_id)
        if series is None:
            raise JobError(f"series {job.series_id} of job {job.id} does not exist")
        study_uid = session.scalar(select(Study.study_instance_uid).where(Study.id == series.study_id)) or ""
        instances = session.scalars(
            select(Instance).where(Instance.series_id == series.id).order_by(Instance.instance_number, Instance.id)
        ).all()
        purged = [i for i in instances if i.purged_at is not None]
        if purged:
            raise JobError(f"{len(purged)} received file(s) of series {series.id} were purged; cannot process")
        files = tuple((i.sop_instance_uid, runtime.store.path_for(i.file_path)) for i in instances)
        return _SeriesInput(
            series_id=series.id,
            series_instance_uid=series.series_instance_uid,
            study_instance_uid=study_uid,
            generation=job.generation or series.generation,
            current_generation=series.generation,
            modality=series.modality,
            files=files,
        )


def _existing_result(session: Session, series_id: int, generation: int, sha256: str) -> Result | None:
    return session.scalar(
        select(Result).where(
            Result.series_id == series_id, Result.generation == generation, Result.model_sha256 == sha256
        )
    )


def _complete_only(runtime: Runtime, job: Job, worker_id: str, reason: str, *, done: int | None = None) -> None:
    """Finish ``job`` without a new result; ``done``: the series (queued again by a reprocess whose result
    already exists) goes back to ``done`` instead of staying ``queued`` for ever."""
    with runtime.session_factory.begin() as session:
        queue.complete(session, job.id, worker_id)
        series = session.get(Series, done) if done is not None else None
        if series is not None and series.generation == job.generation and series.state == SeriesState.QUEUED:
            series.state = SeriesState.DONE
    log.info("job_completed_without_result", job_id=job.id, reason=reason)


def _mark_processing(runtime: Runtime, series_id: int, generation: int) -> None:
    with runtime.session_factory.begin() as session:
        series = session.get(Series, series_id)
        if series is not None and series.generation == generation and series.state != SeriesState.PROCESSING:
            series.state = SeriesState.PROCESSING


def _gate_refusal(
    data: _SeriesInput, triage: Triage, error: PixelDecodeError
) -> tuple[DecodedSeries, SeriesAssessment, dict[int, str]] | None:
    """An undecodable series the model would refuse anyway (e.g. a Siemens mosaic DWI/fMRI) is recorded as
    ``not_assessable`` with the gate's reason instead of failing: operators see why, not an alarm."""
    header, images = read_series_header([path for _, path in data.files])
    reason = gate_reason(series_meta(header, images))
    if reason is None:
        return None
    log.info("series_not_decoded_but_refused", reason=reason, decode_error=queue.error_line(error))
    assessment = triage.refused(reason, 0)  # no slice was decoded
    return DecodedSeries(slices=(), header=header), assessment, {}


def _save_cams(runtime: Runtime, data: _SeriesInput, triage: Triage, assessment: SeriesAssessment) -> dict[int, str]:
    """One ``.npy`` per key slice: its Grad-CAM map, or for a reformatted series ``[map, image]`` stacked, since
    no received instance holds a reformatted slice (the export renders the image from this file; a key slice
    beyond ``cam_top_k`` has a map of NaN, i.e. none)."""
    paths: dict[int, str] = {}
    for index in sorted(set(assessment.cams) | set(assessment.key_images)):
        relative = f"cams/{data.series_id}/{data.generation}/{triage.weights_sha256[:16]}/{index:04d}.npy"
        image = assessment.key_images.get(index)
        cam = assessment.cams.get(index)
        if image is None:
            array = np.asarray(cam, dtype=np.float32)
        else:
            image = np.asarray(image, dtype=np.float32)
            map_ = np.full_like(image, np.nan) if cam is None else np.asarray(cam, dtype=np.float32)
            array = np.stack([map_, image])
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        runtime.store.write_atomic(relative, buffer.getvalue())
        paths[index] = relative
    return paths


def _build_result(
    *,
    job: Job,
    data: _SeriesInput,
    decoded: DecodedSeries,
    triage: Triage,
    assessment: SeriesAssessment,
    cam_paths: dict[int, str],
    timings: dict[str, float],
) -> Result:
    result = Result(
        series_id=data.series_id,
        job_id=job.id,
        generation=data.generation,
        model_name=triage.model_name,
        model_version=triage.model_version,
        model_sha256=triage.weights_sha256,
        status=ResultStatus.ASSESSED if assessment.assessable else ResultStatus.NOT_ASSESSABLE,
        reason=assessment.reason,
        label=assessment.label if assessment.assessable else None,
        probabilities=dict(assessment.class_probabilities),
        urgency=assessment.urgency if assessment.assessable else None,
        threshold=assessment.threshold,
        urgent=bool(assessment.urgent and assessment.assessable),
        ood_score=assessment.ood_score,
        timings=timings,
    )
    probabilities = np.asarray(assessment.slice_probabilities, dtype=np.float32)
    sources: list[tuple[str, int | None]]  # (SOP instance UID, frame number) each row refers to
    if assessment.reformat is not None and decoded.slices and probabilities.ndim == 2:
        # Scored on an axial reformat: every row refers to the whole volume, named by its middle instance.
        middle = decoded.slices[len(decoded.slices) // 2]
        sources = [(middle.sop_instance_uid, None)] * probabilities.shape[0]
    elif probabilities.ndim == 2 and probabilities.shape[0] == len(decoded.slices):
        sources = [(s.sop_instance_uid, s.frame_number) for s in decoded.slices]
    else:
        return result  # gate refused before inference: no per-slice rows
    classes = list(triage.classes)
    no_tumour = classes.index(NO_TUMOUR) if NO_TUMOUR in classes else None
    keys = set(assessment.key_slice_indices)
    for index, ((sop_instance_uid, frame_number), row) in enumerate(zip(sources, probabilities, strict=True)):
        tumour = 1.0 - float(row[no_tumour]) if no_tumour is not None else float(row.max())
        result.slice_predictions.append(
            SlicePrediction(
                slice_index=index,
                sop_instance_uid=sop_instance_uid,
                frame_number=frame_number,
                probabilities=[float(v) for v in row],
                tumour_probability=tumour,
                in_brain=bool(assessment.slice_in_brain[index]),
                is_key=index in keys,
                cam_path=cam_paths.get(index),
            )
        )
    return result


def _commit(
    runtime: Runtime, job: Job, worker_id: str, data: _SeriesInput, result: Result
) -> tuple[Result | None, int]:
    """The one transaction: result rows, export jobs, series state, job completion. Returns (result, exports)."""
    settings = runtime.settings
    with runtime.session_factory.begin() as session:
        if _existing_result(session, data.series_id, data.generation, result.model_sha256) is not None:
            queue.complete(session, job.id, worker_id)
            return None, 0
        session.add(result)
        session.flush()
        exports = 0
        if should_export(settings, result):
            created = queue.enqueue(
                session,
                JobKind.EXPORT,
                dedupe_key=f"export:{result.id}",
                series_id=data.series_id,
                generation=data.generation,
                payload={"result_id": result.id},
                priority=URGENT_EXPORT_PRIORITY if result.urgent else 0,
                max_attempts=settings.worker.export_max_attempts,
            )
            exports = int(created is not None)
        for name in notify_targets(settings, result):
            queue.enqueue(
                session,
                JobKind.EXPORT,
                dedupe_key=f"notify:{name}:{result.id}",
                series_id=data.series_id,
                generation=data.generation,
                payload={"result_id": result.id, "notify": name},
                priority=URGENT_EXPORT_PRIORITY if result.urgent else 0,
                max_attempts=settings.worker.export_max_attempts,
            )
        series = session.get(Series, data.series_id)
        if series is not None and series.generation == data.generation:
            series.state = SeriesState.DONE
            series.skip_reason = None if result.status == ResultStatus.ASSESSED else result.reason
        queue.complete(session, job.id, worker_id)
    return result, exports


def run_infer_job(runtime: Runtime, job: Job) -> None:
    """Handler for ``infer`` jobs (``Handler = Callable[[Runtime, Job], None]``)."""
    worker_id = job.lease_owner or ""
    started = time.perf_counter()
    data = _load_input(runtime, job)
    structlog.contextvars.bind_contextvars(
        series_uid=uid_hash(data.series_instance_uid), study_uid=uid_hash(data.study_instance_uid)
    )
    if data.generation != data.current_generation:
        _complete_only(runtime, job, worker_id, f"superseded by generation {data.current_generation}")
        return
    triage = runtime.triage_for(job.payload.get("model_dir"))
    with runtime.session_factory() as session:
        duplicate = _existing_result(session, data.series_id, data.generation, triage.weights_sha256) is not None
    if duplicate:
        _complete_only(runtime, job, worker_id, "result already exists", done=data.series_id)
        return
    _mark_processing(runtime, data.series_id, data.generation)
    timings: dict[str, float] = {}
    try:
        t = time.perf_counter()
        decoded = decode_series([path for _, path in data.files])
        timings["decode"] = time.perf_counter() - t
        meta = series_meta(decoded.header, len(decoded.slices), slice_geometry(decoded.slices))
        t = time.perf_counter()
        assessment = triage.assess([s.pixels for s in decoded.slices], meta, cam_top_k=runtime.settings.model.cam_top_k)
        assess_seconds = time.perf_counter() - t
        metrics.INFERENCE_SECONDS.observe(assess_seconds)
        timings.update({k: float(v) for k, v in assessment.timings.items()})
        t = time.perf_counter()
        cam_paths = _save_cams(runtime, data, triage, assessment)
        timings["cam_save"] = time.perf_counter() - t
    except FileNotFoundError as exc:
        raise PixelDecodeError(f"received file missing: {Path(exc.filename or '').name}") from exc
    except PixelDecodeError as exc:
        refusal = _gate_refusal(data, triage, exc)
        if refusal is None:
            raise
        decoded, assessment, cam_paths = refusal
        timings["decode"] = time.perf_counter() - t
    result = _build_result(
        job=job, data=data, decoded=decoded, triage=triage, assessment=assessment, cam_paths=cam_paths, timings=timings
    )
    t = time.perf_counter()
    try:
        committed, exports = _commit(runtime, job, worker_id, data, result)
    except IntegrityError:
        # A concurrent job for the same (series, generation, model) committed first: we are a duplicate.
        _complete_only(runtime, job, worker_id, "result committed concurrently")
        return
    timings["db"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - started
    if committed is None:
        log.info("job_completed_without_result", job_id=job.id, reason="result already exists")
        return
    _record_total_timings(runtime, committed.id, timings)
    log.info(
        "series_processed",
        job_id=job.id,
        result_id=committed.id,
        status=str(committed.status),
        label=committed.label,
        urgent=committed.urgent,
        slices=len(decoded.slices),
        reformat=assessment.reformat,
        exports=exports,
        completed_at=utcnow().isoformat(),
        **{f"{k}_s": round(v, 4) for k, v in timings.items()},
    )


def _record_total_timings(runtime: Runtime, result_id: int, timings: dict[str, float]) -> None:
    """The db/total timings are only known after the commit; store them in a tiny follow-up write."""
    with runtime.session_factory.begin() as session:
        result = session.get(Result, result_id)
        if result is not None:
            result.timings = dict(timings)
