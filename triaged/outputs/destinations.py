"""Destinations as first-class state: which peer a result goes to, and the circuit breaker around it.

An unreachable destination is a *state*, not a failed attempt (design: Delivery). Export jobs that find it
down wait without spending attempts (:class:`~triaged.errors.DestinationDownError`, handled by the worker);
housekeeping probes it with C-ECHO under exponential backoff and bounded timeouts, and once it answers, its
jobs are claimable again in their original order (urgent first, oldest first). Jobs that were never
delivered within ``outputs.max_age_hours`` become dead, loudly (one event, a counter).
"""

from __future__ import annotations

from datetime import datetime, timedelta

import structlog
from sqlalchemy.orm import Session, sessionmaker

from triaged import metrics
from triaged.config import Settings
from triaged.db import destinations, queue
from triaged.db.models import DestinationState, utcnow
from triaged.errors import ConfigError, DestinationDownError, DicomPeerError
from triaged.outputs import dicomweb, hl7
from triaged.outputs.dicomweb import DicomwebDestination
from triaged.outputs.dimse import Destination
from triaged.outputs.send import echo
from triaged.outputs.tls import destination_ssl_context

log = structlog.get_logger()


def resolve_destination(settings: Settings, calling_ae_title: str) -> Destination | DicomwebDestination:
    """``outputs.destination`` if set (a DIMSE peer or a DICOMweb server), else the peer that sent the study."""
    peers = settings.dicom.peers
    name = settings.outputs.destination
    if name is not None and name in settings.outputs.dicomweb:
        return DicomwebDestination(name=name, config=settings.outputs.dicomweb[name])
    if name is not None:
        if name not in peers:
            raise ConfigError(
                f"outputs.destination {name!r} is neither a peer in [dicom.peers] nor a server in [outputs.dicomweb]"
            )
        peer = peers[name]
    else:
        found = settings.dicom.peer_for_ae(calling_ae_title) if calling_ae_title else None
        if found is None:
            raise ConfigError(
                f"no destination for outputs: outputs.destination is not set and the sending AE title "
                f"{calling_ae_title or '(unknown)'!r} is not a configured peer in [dicom.peers]"
            )
        name, peer = found
    context = destination_ssl_context(peer.tls, name)
    return Destination(name=name, ae_title=peer.ae_title, host=peer.host, port=peer.port, ssl_context=context)


def probe_delay(settings: Settings, probes: int) -> timedelta:
    """Wait before the next probe after ``probes`` failed ones: base * 2**probes, capped (no jitter needed:
    one housekeeping process probes, the peer never sees a thundering herd)."""
    outputs = settings.outputs
    return timedelta(seconds=min(outputs.probe_max_seconds, outputs.probe_base_seconds * 2 ** min(probes, 30)))


def probe(settings: Settings, name: str) -> None:
    """Ask destination ``name`` whether it is there; raise :class:`DicomPeerError` when it does not answer.

    C-ECHO for a DIMSE peer, one QIDO-RS request for a DICOMweb server, a TCP connection for an MLLP receiver.
    Any answer counts (even a non-success status): the peer is there, so sending can resume.
    """
    if name in settings.outputs.dicomweb:
        dicomweb.probe(DicomwebDestination(name=name, config=settings.outputs.dicomweb[name]))
        return
    if name in settings.notify:
        hl7.probe(hl7.Hl7Destination(name=name, config=settings.notify[name]))
        return
    peer = settings.dicom.peers.get(name)
    if peer is None:
        return  # no longer configured: let the jobs run and fail with the configuration error
    echo(
        peer.host,
        peer.port,
        called_ae_title=peer.ae_title,
        calling_ae_title=settings.dicom.ae_title,
        timeout=settings.outputs.probe_timeout_seconds,
        ssl_context=destination_ssl_context(peer.tls, name),
    )


def probe_due_destinations(
    session_factory: sessionmaker[Session], settings: Settings, now: datetime | None = None
) -> list[str]:
    """Probe every down destination whose probe is due; return the names found up again (housekeeping)."""
    now = now or utcnow()
    with session_factory() as session:
        due = destinations.due_for_probe(session, now)
    back: list[str] = []
    for name, probes in due:
        try:
            probe(settings, name)
        except (DicomPeerError, DestinationDownError, OSError) as exc:
            with session_factory.begin() as session:
                count = destinations.probe_failed(
                    session, name, queue.error_line(exc), next_probe_after=probe_delay(settings, probes + 1), now=now
                )
            log.info("destination_probe_failed", destination=name, probes=count, error=queue.error_line(exc))
            continue
        with session_factory.begin() as session:
            before = destinations.mark_up(session, name, now)
        if before is not None:
            down_for = (now - before.down_since).total_seconds() if before.down_since else None
            log.warning("destination_up", destination=name, probes=before.probes + 1, down_seconds=down_for)
            metrics.DESTINATION_UP.labels(destination=name).set(1)
            back.append(name)
    return back


def expire_old_exports(session_factory: sessionmaker[Session], settings: Settings, now: datetime | None = None) -> int:
    """Export jobs not delivered within ``outputs.max_age_hours`` become dead: one event each, counted."""
    expired = queue.expire_old_exports(session_factory, timedelta(hours=settings.outputs.max_age_hours), now)
    for job in expired:
        metrics.EXPORTS_DEAD.labels(reason="max_age").inc()
        log.error(
            "export_dead",
            reason="max_age",
            job_id=job.id,
            destination=job.destination,
            attempts=job.attempts,
            max_age_hours=settings.outputs.max_age_hours,
            error=job.last_error,
        )
    return len(expired)


def refresh_destination_gauges(session_factory: sessionmaker[Session], now: datetime | None = None) -> None:
    """Up/down, pending exports and the age of the oldest pending urgent result, per destination."""
    now = now or utcnow()
    with session_factory() as session:
        rows = destinations.summaries(session)
    for row in rows:
        metrics.DESTINATION_UP.labels(destination=row.name).set(1 if row.state == DestinationState.UP else 0)
        metrics.OUTPUTS_PENDING.labels(destination=row.name).set(row.pending_exports)
        age = (now - row.oldest_pending_urgent).total_seconds() if row.oldest_pending_urgent else 0.0
        metrics.OLDEST_PENDING_URGENT_SECONDS.labels(destination=row.name).set(max(0.0, age))
