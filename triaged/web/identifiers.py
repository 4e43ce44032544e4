"""Study identifiers for display, read from a stored source header (the database holds none, by design).

The accession number is always shown (it is how a reading room finds a study); patient name and ID only
with ``http.show_patient_identifiers = true``. Nothing read here is ever logged.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pydicom
from pydantic import BaseModel, ConfigDict
from pydicom.errors import InvalidDicomError

_TAGS = ["AccessionNumber", "PatientName", "PatientID"]


class StudyIdentifiers(BaseModel):
    model_config = ConfigDict(frozen=True)

    accession_number: str | None = None
    patient_name: str | None = None
    patient_id: str | None = None


@functools.lru_cache(maxsize=1024)
def _read(path: Path) -> tuple[str, str, str]:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_TAGS)
    except (OSError, InvalidDicomError):
        return "", "", ""
    return (
        str(ds.get("AccessionNumber", "") or ""),
        str(ds.get("PatientName", "") or ""),
        str(ds.get("PatientID", "") or ""),
    )


def study_identifiers(path: Path | None, *, show_patient: bool) -> StudyIdentifiers:
    if path is None:  # files purged by retention, or nothing stored yet
        return StudyIdentifiers()
    accession, name, patient_id = _read(path)
    if not show_patient:
        return StudyIdentifiers(accession_number=accession or None)
    return StudyIdentifiers(
        accession_number=accession or None, patient_name=name or None, patient_id=patient_id or None
    )
