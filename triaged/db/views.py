"""What the read queries return: typed, JSON-ready records shared by the CLI, the JSON API and the console.

They are pydantic models so that one definition is at once the CLI's ``--json`` shape, the API's response
schema (FastAPI writes it into the OpenAPI document) and the values the console templates render.
Only UIDs and technical metadata: patient identifiers never come from the database (it has none).
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict


class _View(BaseModel):
    model_config = ConfigDict(frozen=True)


class SeriesSummary(_View):
    """One worklist row: the series and its latest result (for its current or an older generation)."""

    id: int
    series_instance_uid: str
    study_instance_uid: str
    modality: str
    state: str
    generation: int
    instance_count: int
    calling_ae_title: str
    skip_reason: str | None
    first_received_at: datetime
    last_received_at: datetime
    completed_at: datetime | None
    result_status: str | None = None
    label: str | None = None
    urgency: float | None = None
    threshold: float | None = None
    urgent: bool = False
    not_assessable_reason: str | None = None
    result_at: datetime | None = None
    seconds_to_result: float | None = None


class SeriesPage(_View):
    """A page of the worklist: urgent first, then the most recently received."""

    total: int
    offset: int
    limit: int
    items: list[SeriesSummary]


class InstanceGroup(_View):
    sop_class_uid: str
    transfer_syntax_uid: str
    count: int
    bytes: int


class JobView(_View):
    id: int
    kind: str
    state: str
    priority: int
    series_instance_uid: str | None
    generation: int | None
    attempts: int
    max_attempts: int
    destination: str | None
    run_after: datetime
    lease_owner: str | None
    last_error: str | None
    created_at: datetime
    finished_at: datetime | None


class JobPage(_View):
    total: int
    offset: int
    limit: int
    items: list[JobView]


class SliceView(_View):
    slice_index: int
    sop_instance_uid: str
    frame_number: int | None
    probabilities: list[float]
    tumour_probability: float
    in_brain: bool
    is_key: bool
    cam_path: str | None


class OutputView(_View):
    """One object we built, and whether it reached its destination."""

    id: int
    kind: str
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    destination: str | None
    sent_at: datetime | None
    delivery: str  # "sent", "pending" (an export job is queued/running), "dead", "failed" or "not sent"


class ResultView(_View):
    id: int
    job_id: int | None
    generation: int
    model: str  # "name version", as the CLI tables print it
    model_name: str
    model_version: str
    model_sha256: str
    status: str
    reason: str | None
    label: str | None
    probabilities: dict[str, float]
    urgency: float | None
    threshold: float | None
    urgent: bool
    ood_score: float | None
    timings: dict[str, float]
    created_at: datetime
    slices: list[SliceView]
    outputs: list[OutputView]


class SeriesDetail(SeriesSummary):
    """One series: its instances by SOP class and transfer syntax, its jobs and every result."""

    instances: list[InstanceGroup]
    jobs: list[JobView]
    results: list[ResultView]


# alive, stopped, dead (heartbeat older than the time-out), unknown (holds open associations but has no row)
ReceiverState = Literal["alive", "stopped", "dead", "unknown"]


class ReceiverView(_View):
    """One receiver process: its liveness (alive, stopped, dead: heartbeat timed out) and open associations."""

    id: str
    host: str
    pid: int | None
    started_at: datetime | None
    heartbeat_at: datetime | None
    stopped_at: datetime | None
    open_associations: int
    state: ReceiverState


class DestinationView(_View):
    name: str
    state: str
    down_since: datetime | None
    probes: int
    last_error: str | None
    pending_exports: int
    oldest_pending_urgent: datetime | None
