"""Worklist notifications: one HL7 ORU^R01 per assessed series to each ``[notify.NAME]`` receiver.

A notification is an ``export`` job whose payload names the receiver (``{"result_id": …, "notify": NAME}``), so it
goes through the same queue, backoff, maximum age and per-destination circuit breaker as the DICOM outputs, and
never waits for them: a PACS that is down does not hold back the worklist, nor the reverse. The job reads the
identifiers the RIS matches on (patient ID, accession number) from the stored source header, as the PACS sent
them; the database holds no patient data (design: PHI).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import pydicom
import structlog
from pydicom.errors import InvalidDicomError
from sqlalchemy import select
from sqlalchemy.orm import Session

from triaged.config import Settings
from triaged.db import destinations, queue
from triaged.db.models import DestinationState, Instance, Job, Result, ResultStatus, Series, Study
from triaged.errors import ConfigError, DestinationDownError, JobError
from triaged.export import summary_of
from triaged.log import uid_hash
from triaged.outputs import hl7
from triaged.outputs.summary import series_uid
from triaged.runtime import Runtime

log = structlog.get_logger()

_HEADER_TAGS = ["PatientID", "PatientName", "AccessionNumber", "StudyInstanceUID"]


def notify_targets(settings: Settings, result: Result) -> list[str]:
    """The receivers that get a message for ``result``: assessed series only, urgent ones or all per receiver."""
    if result.status != ResultStatus.ASSESSED:
        return []
    return [name for name, config in sorted(settings.notify.items()) if config.mode == "all" or result.urgent]


def sends_secondary_capture(settings: Settings, result: Result) -> bool:
    """Whether an SC series will exist for ``result`` (the same rule as the DICOM outputs), so the RIS may link it."""
    outputs = settings.outputs
    return outputs.secondary_captures and (outputs.mode == "all" or (outputs.mode == "urgent" and result.urgent))


@dataclass(frozen=True)
class _Source:
    patient_id: str
    patient_name: str
    accession_number: str


def _message_control_id(series: Series, result: Result) -> str:
    """Stable per result (MSH-10 is at most 20 characters), so a resend is recognisably the same message."""
    key = f"{series.series_instance_uid}|{result.generation}|{result.model_sha256}"
    return hashlib.sha256(key.encode()).hexdigest()[:20].upper()


def _source(runtime: Runtime, session: Session, series: Series) -> _Source:
    """Identifiers from the first readable stored instance; empty when every source file is gone (purged)."""
    files = session.scalars(
        select(Instance.file_path)
        .where(Instance.series_id == series.id, Instance.purged_at.is_(None))
        .order_by(Instance.instance_number, Instance.id)
        .limit(5)
    ).all()
    for relative in files:
        try:
            ds = pydicom.dcmread(runtime.store.path_for(relative), stop_before_pixels=True, specific_tags=_HEADER_TAGS)
        except (OSError, InvalidDicomError):
            continue
        return _Source(
            patient_id=str(ds.get("PatientID", "") or ""),
            patient_name=str(ds.get("PatientName", "") or ""),
            accession_number=str(ds.get("AccessionNumber", "") or ""),
        )
    log.warning("notify_source_unreadable", instances=len(files))
    return _Source("", "", "")


def _message(runtime: Runtime, result_id: int, destination: hl7.Hl7Destination) -> tuple[hl7.Hl7Result, bool]:
    """The message content and whether the series was superseded by newer instances."""
    with runtime.session_factory() as session:
        result = session.get(Result, result_id)
        if result is None:
            raise JobError(f"result {result_id} does not exist")
        series = session.get(Series, result.series_id)
        study = session.get(Study, series.study_id) if series is not None else None
        if series is None or study is None:
            raise JobError(f"series or study of result {result_id} does not exist")
        summary = summary_of(result, series)
        source = _source(runtime, session, series)
        message = hl7.Hl7Result(
            summary=summary,
            message_control_id=_message_control_id(series, result),
            observed_at=result.created_at,
            study_instance_uid=study.study_instance_uid,
            sc_series_instance_uid=series_uid(summary, "sc")
            if sends_secondary_capture(runtime.settings, result)
            else None,
            patient_id=source.patient_id,
            patient_name=source.patient_name,
            accession_number=source.accession_number,
        )
        return message, series.generation > result.generation


def run_notify_job(runtime: Runtime, job: Job) -> None:
    """Handler for notification ``export`` jobs: build the ORU^R01, send it, complete the job on AA/CA."""
    worker_id = job.lease_owner or ""
    try:
        result_id, name = int(job.payload["result_id"]), str(job.payload["notify"])
    except (KeyError, TypeError, ValueError) as exc:
        raise JobError(f"notify job {job.id} has no valid result_id/notify in its payload") from exc
    config = runtime.settings.notify.get(name)
    if config is None:
        raise ConfigError(f"config error: notify.{name} is not configured (job {job.id})")
    destination = hl7.Hl7Destination(name=name, config=config)
    content, superseded = _message(runtime, result_id, destination)
    structlog.contextvars.bind_contextvars(
        job_id=job.id, result_id=result_id, series_uid=uid_hash(content.summary.series_instance_uid)
    )
    if superseded:
        with runtime.session_factory.begin() as session:
            queue.complete(session, job.id, worker_id)
        log.info("notify_superseded", destination=name)
        return
    with runtime.session_factory.begin() as session:
        state = destinations.prepare_export(session, job.id, name)
    if state == DestinationState.DOWN:
        raise DestinationDownError(f"destination {name} is down", destination=name)
    code = hl7.send_message(hl7.build_oru(content, config), destination)
    with runtime.session_factory.begin() as session:
        destinations.confirm_delivery(session, name)
        queue.complete(session, job.id, worker_id)
    log.info("notify_done", destination=name, ack=code, urgent=content.summary.urgent)
