"""Structured logging: structlog everywhere, stdlib loggers routed through it, and PHI-safe helpers.

Never log patient name, ID, birth date or accession number. UIDs are logged only through
:func:`uid_hash`, a short stable digest that lets operators correlate lines without exposing the UID.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from typing import Literal

import structlog

LogFormat = Literal["auto", "json", "console"]

# pynetdicom's DEBUG handlers dump PDUs and identifiers; highdicom logs the raw SOP Instance UID of every source
# it copies from at INFO; dicomweb-client and urllib3 log request URLs (with study UIDs) at INFO/DEBUG. Kept at
# WARNING whatever log_level says, so no raw UID reaches the log (triaged logs uid_hash instead).
_NOISY_LOGGERS = {
    "pynetdicom": logging.WARNING,
    "highdicom": logging.WARNING,
    "dicomweb_client": logging.WARNING,
    "urllib3": logging.WARNING,
    "sqlalchemy": logging.WARNING,
    "alembic": logging.WARNING,
    "apscheduler": logging.WARNING,
    "PIL": logging.WARNING,
}


def uid_hash(uid: str | None) -> str:
    """Return a 12-hex-digit digest of a UID, for logs (UIDs of real studies can be identifying)."""
    if not uid:
        return "-"
    return hashlib.sha256(uid.encode("ascii", "replace")).hexdigest()[:12]


def configure_logging(level: str = "info", log_format: LogFormat = "auto") -> None:
    """Configure structlog and the stdlib root logger once, at the composition root."""
    use_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer(colors=False)
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info if use_json else _identity,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    numeric_level = logging.getLevelNamesMapping()[level.upper()]
    root.setLevel(numeric_level)
    for name, floor in _NOISY_LOGGERS.items():
        logging.getLogger(name).setLevel(max(floor, numeric_level))
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        # Not cached: a cached module-level logger would keep the first configuration for the life of the
        # process, so reconfiguring (and structlog.testing.capture_logs) would silently miss it. The cost is
        # a dict lookup per log call, negligible next to an fsync per instance.
        cache_logger_on_first_use=False,
    )


def _identity(logger: object, method_name: str, event_dict: structlog.types.EventDict) -> structlog.types.EventDict:
    return event_dict
