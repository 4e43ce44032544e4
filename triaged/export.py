"""The ``export`` job handler: build a result's DICOM outputs once, then send what is not yet sent.

Order matters for exactly-once delivery to a PACS that de-duplicates by SOP Instance UID:

1. if the result has no ``outputs`` rows, build the objects (UIDs derived from the result), write the files
   durably and insert the rows in one short transaction — the UIDs exist before anything is sent;
2. send every output whose ``sent_at`` is empty, marking each one in its own short transaction as soon as
   the peer confirms it, so a retry after a failure resends only what is left (with the same UIDs);
3. complete the job in a final transaction.

All network work happens outside database transactions (SQLite has one writer lock, the receiver needs it).
A destination that does not answer (refused, timed out, rejected the association) is not the job's fault: the
job raises :class:`~triaged.errors.DestinationDownError`, the worker marks the destination down and gives the
attempt back, and the job waits until a probe finds the destination up (:mod:`triaged.outputs.destinations`).
Only a peer that answered and refused an object spends an attempt; ``queue.fail`` applies the backoff and, in
the end, ``dead``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import structlog
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from sqlalchemy import select
from sqlalchemy.orm import Session

from triaged.db import audit, destinations, queue
from triaged.db.models import (
    DestinationState,
    Instance,
    Job,
    Output,
    OutputKind,
    Result,
    ResultStatus,
    Series,
    SlicePrediction,
    utcnow,
)
from triaged.errors import DestinationDownError, DicomPeerError, JobError, OutputBuildError
from triaged.log import uid_hash
from triaged.outputs import dicomweb
from triaged.outputs.build import build_outputs, encode
from triaged.outputs.destinations import resolve_destination
from triaged.outputs.dimse import SendOptions, StoreResult, send_files
from triaged.outputs.summary import BuiltOutput, KeySlice, TriageSummary
from triaged.runtime import Runtime

log = structlog.get_logger()


@dataclass(frozen=True)
class _Plan:
    """Everything read from the database for one export, detached from the session."""

    result_id: int
    summary: TriageSummary
    calling_ae_title: str
    keys: tuple[tuple[str, int | None, str | None, float], ...]  # sop uid, frame, cam path, tumour p
    instance_files: dict[str, str]  # sop instance uid -> relative file path
    middle_instance: str | None
    outputs: tuple[tuple[int, str, bool], ...]  # output id, relative file path, already sent
    superseded: bool = False  # newer instances re-opened the series: a newer result will follow


def summary_of(result: Result, series: Series) -> TriageSummary:
    """The builders' view of a result (no database types past this point)."""
    return TriageSummary(
        series_instance_uid=series.series_instance_uid,
        generation=result.generation,
        status="assessed" if result.status == ResultStatus.ASSESSED else "not_assessable",
        model_name=result.model_name,
        model_version=result.model_version,
        model_sha256=result.model_sha256,
        label=result.label,
        probabilities=dict(result.probabilities or {}),
        urgency=result.urgency,
        threshold=result.threshold,
        urgent=bool(result.urgent),
        reason=result.reason,
    )


def _load_plan(session: Session, result_id: int) -> _Plan:
    result = session.get(Result, result_id)
    if result is None:
        raise JobError(f"result {result_id} does not exist")
    series = session.get(Series, result.series_id)
    if series is None:
        raise JobError(f"series {result.series_id} of result {result_id} does not exist")
    keys = session.scalars(
        select(SlicePrediction)
        .where(SlicePrediction.result_id == result_id, SlicePrediction.is_key)
        # Most suspicious first, so "key image 1 of N" is the one a radiologist should look at first.
        .order_by(SlicePrediction.tumour_probability.desc(), SlicePrediction.slice_index)
    ).all()
    instances = session.scalars(
        select(Instance)
        .where(Instance.series_id == series.id, Instance.purged_at.is_(None))
        .order_by(Instance.instance_number, Instance.id)
    ).all()
    outputs = session.scalars(select(Output).where(Output.result_id == result_id).order_by(Output.id)).all()
    return _Plan(
        result_id=result_id,
        summary=summary_of(result, series),
        calling_ae_title=series.calling_ae_title,
        keys=tuple((k.sop_instance_uid, k.frame_number, k.cam_path, k.tumour_probability) for k in keys),
        instance_files={i.sop_instance_uid: i.file_path for i in instances},
        middle_instance=instances[len(instances) // 2].sop_instance_uid if instances else None,
        outputs=tuple((o.id, o.file_path, o.sent_at is not None) for o in outputs),
        superseded=series.generation > result.generation,
    )


def _read_source(runtime: Runtime, plan: _Plan, sop_instance_uid: str, *, pixels: bool) -> Dataset:
    relative = plan.instance_files.get(sop_instance_uid)
    if relative is None:
        raise OutputBuildError(f"source instance {uid_hash(sop_instance_uid)} is no longer stored")
    try:
        return pydicom.dcmread(runtime.store.path_for(relative), stop_before_pixels=not pixels)
    except (OSError, InvalidDicomError) as exc:
        raise OutputBuildError(f"cannot read source instance {uid_hash(sop_instance_uid)}: {exc}") from exc


def _load_cam(runtime: Runtime, relative: str | None) -> NDArray[np.float32] | None:
    if relative is None:
        return None
    try:
        return np.asarray(np.load(runtime.store.path_for(relative)), dtype=np.float32)
    except (OSError, ValueError) as exc:
        raise OutputBuildError(f"cannot read Grad-CAM map {relative}: {exc}") from exc


def _key_slices(runtime: Runtime, plan: _Plan, datasets: dict[str, Dataset]) -> list[KeySlice]:
    """The key slices whose source and Grad-CAM map can be read; one that cannot costs only its own SC."""
    keys: list[KeySlice] = []
    for position, (sop_instance_uid, frame_number, cam_path, tumour_probability) in enumerate(plan.keys):
        try:
            if sop_instance_uid not in datasets:
                datasets[sop_instance_uid] = _read_source(runtime, plan, sop_instance_uid, pixels=True)
            cam = _load_cam(runtime, cam_path)
        except OutputBuildError as exc:
            log.warning("output_source_unreadable", key_index=position, error=type(exc.__cause__ or exc).__name__)
            continue
        pixels = None
        if cam is not None and cam.ndim == 3:  # a reformatted slice: [Grad-CAM map, image] (pipeline._save_cams)
            stacked = cam
            pixels = stacked[1]
            cam = None if np.isnan(stacked[0]).all() else stacked[0]
        keys.append(KeySlice(datasets[sop_instance_uid], frame_number, cam, tumour_probability, pixels))
    return keys


def _evidence(runtime: Runtime, plan: _Plan, datasets: dict[str, Dataset]) -> list[Dataset]:
    """Headers of every readable source instance, for the KOS/SR evidence (unreadable ones are counted, once)."""
    evidence: list[Dataset] = []
    unreadable = 0
    for uid in sorted(plan.instance_files):
        try:
            evidence.append(datasets.get(uid) or _read_source(runtime, plan, uid, pixels=False))
        except OutputBuildError:
            unreadable += 1
    if unreadable:
        log.warning("output_evidence_unreadable", instances=unreadable, of=len(plan.instance_files))
    return evidence


def _build(runtime: Runtime, plan: _Plan) -> list[BuiltOutput]:
    datasets: dict[str, Dataset] = {}
    keys = _key_slices(runtime, plan, datasets)
    evidence = _evidence(runtime, plan, datasets)
    fallback = None
    if not plan.summary.assessed and plan.middle_instance is not None:
        fallback = _read_source(runtime, plan, plan.middle_instance, pixels=True)
    return build_outputs(plan.summary, keys, evidence, runtime.settings.outputs, fallback_slice=fallback)


def _store_outputs(runtime: Runtime, plan: _Plan, built: list[BuiltOutput], destination: str) -> None:
    """Write the files, then insert all rows in one transaction (unless another attempt already did)."""
    rows: list[Output] = []
    for output in built:
        relative = f"outputs/{plan.result_id}/{output.kind}-{output.index:03d}.dcm"
        runtime.store.write_atomic(relative, encode(output.dataset))
        rows.append(
            Output(
                result_id=plan.result_id,
                kind=OutputKind(output.kind),
                sop_class_uid=output.sop_class_uid,
                sop_instance_uid=output.sop_instance_uid,
                series_instance_uid=output.series_instance_uid,
                file_path=relative,
                destination=destination,
            )
        )
    with runtime.session_factory.begin() as session:
        if session.scalar(select(Output.id).where(Output.result_id == plan.result_id).limit(1)) is None:
            session.add_all(rows)


def _mark_sent(runtime: Runtime, by_path: dict[Path, int], destination: str) -> Callable[[StoreResult], None]:
    def mark(stored: StoreResult) -> None:
        with runtime.session_factory.begin() as session:
            output = session.get(Output, by_path[stored.path])
            if output is not None:
                output.sent_at = utcnow()
                output.destination = destination
            destinations.confirm_delivery(session, destination)

    return mark


def run_export_job(runtime: Runtime, job: Job) -> None:
    """Handler for ``export`` jobs (payload ``{"result_id": int}``)."""
    worker_id = job.lease_owner or ""
    try:
        result_id = int(job.payload["result_id"])
    except (KeyError, TypeError, ValueError) as exc:
        raise JobError(f"export job {job.id} has no valid result_id in its payload") from exc
    with runtime.session_factory() as session:
        plan = _load_plan(session, result_id)
    structlog.contextvars.bind_contextvars(
        job_id=job.id, result_id=result_id, series_uid=uid_hash(plan.summary.series_instance_uid)
    )
    if plan.superseded and not any(sent for _, _, sent in plan.outputs):
        with runtime.session_factory.begin() as session:
            queue.complete(session, job.id, worker_id)
        log.info("export_superseded", generation=plan.summary.generation)
        return
    destination = resolve_destination(runtime.settings, plan.calling_ae_title)
    with runtime.session_factory.begin() as session:
        state = destinations.prepare_export(session, job.id, destination.name)
    if state == DestinationState.DOWN:
        raise DestinationDownError(f"destination {destination.name} is down", destination=destination.name)
    built_count = 0
    if not plan.outputs:
        built = _build(runtime, plan)
        built_count = len(built)
        if built:
            _store_outputs(runtime, plan, built, destination.name)
            with runtime.session_factory() as session:
                plan = _load_plan(session, result_id)
    pending = [(output_id, runtime.store.path_for(path)) for output_id, path, sent in plan.outputs if not sent]
    dicom = runtime.settings.dicom
    options = SendOptions(
        calling_ae_title=dicom.ae_title,
        acse_timeout=dicom.acse_timeout,
        dimse_timeout=dicom.dimse_timeout,
        network_timeout=dicom.network_timeout,
    )
    by_path = {path: output_id for output_id, path in pending}
    on_stored = _mark_sent(runtime, by_path, destination.name)
    paths = [path for _, path in pending]
    try:
        if isinstance(destination, dicomweb.DicomwebDestination):
            sent = dicomweb.send_files(paths, destination, on_stored=on_stored)
        else:
            sent = send_files(paths, destination, options, on_stored=on_stored)
    except DicomPeerError as exc:  # no answer at all: the destination is down, not this job's objects
        raise DestinationDownError(str(exc), destination=destination.name) from exc
    with runtime.session_factory.begin() as session:
        queue.complete(session, job.id, worker_id)
        audit.record_export_outcome(session, job.id, outcome="sent", actor=worker_id)
    log.info(
        "export_done",
        destination=destination.name,
        built=built_count,
        sent=len(sent),
        warnings=sum(1 for s in sent if s.warning),
        total=len(plan.outputs),
    )
