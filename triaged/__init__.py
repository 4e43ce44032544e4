"""triaged: a DICOM/PACS-integrated batch triage daemon for brain MRI."""

from __future__ import annotations

__version__ = "0.1.0"
