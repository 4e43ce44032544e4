"""Receiving: the Storage SCP, its processes and reactor, durable ingest, series completion, TLS and statuses.

Knows nothing of outputs or ml (design.md, "Package layout"); shares ``triaged.dicom`` with delivering.
"""

from __future__ import annotations
