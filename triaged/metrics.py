"""Prometheus metrics, one registry per process; the daemon serves them with /healthz and /readyz."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

INSTANCES_RECEIVED = Counter(
    "triaged_instances_received", "Instances stored durably and acknowledged", registry=REGISTRY
)
INSTANCES_REJECTED = Counter(
    "triaged_instances_rejected",
    "C-STORE requests answered with a failure status",
    ["reason"],
    registry=REGISTRY,
)
ASSOCIATIONS_CLOSED_FOR_GONE_RECEIVER = Counter(
    "triaged_associations_closed_for_gone_receiver",
    "Open associations closed because their receiver is gone (reaped: heartbeat timed out; forgotten: "
    "`receivers forget`; restarted: the receiver started again after a crash)",
    ["outcome"],
    registry=REGISTRY,
)
SERIES_COMPLETED = Counter("triaged_series_completed", "Series declared complete", registry=REGISTRY)
JOBS_BY_STATE = Gauge("triaged_jobs", "Jobs by kind and state", ["kind", "state"], registry=REGISTRY)
QUEUE_DEPTH = Gauge("triaged_queue_depth", "Jobs waiting to run", registry=REGISTRY)
INFERENCE_SECONDS = Histogram(
    "triaged_inference_seconds",
    "Wall time of one series inference",
    buckets=(0.5, 1, 2, 5, 10, 20, 40, 80, 160),
    registry=REGISTRY,
)
EXPORT_FAILURES = Counter("triaged_export_failures", "Failed sends of outputs to a PACS", registry=REGISTRY)
DESTINATION_UP = Gauge(
    "triaged_destination_up", "1 while the destination answers, 0 while it is down", ["destination"], registry=REGISTRY
)
OUTPUTS_PENDING = Gauge(
    "triaged_outputs_pending",
    "Export jobs (one result's outputs each) waiting for or being sent to the destination",
    ["destination"],
    registry=REGISTRY,
)
OLDEST_PENDING_URGENT_SECONDS = Gauge(
    "triaged_oldest_pending_urgent_output_age_seconds",
    "Age of the oldest urgent result not yet delivered to the destination (0 when none)",
    ["destination"],
    registry=REGISTRY,
)
EXPORTS_DEAD = Counter(
    "triaged_exports_dead",
    "Export jobs given up (attempts: the peer kept refusing the objects; max_age: never delivered in time)",
    ["reason"],
    registry=REGISTRY,
)
