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
