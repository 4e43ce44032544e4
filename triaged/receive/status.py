"""Named DIMSE status codes the receiver answers with (style P4: the DICOM boundary speaks status codes).

Values are from PS3.4 Annex B.2.3 (Storage Service Class statuses) and PS3.7 Annex C (general statuses).
Every failure is answered as a Dataset carrying ``Status`` and a short ``ErrorComment`` so the sending
operator sees why, without any PHI.
"""

from __future__ import annotations

from pydicom.dataset import Dataset

SUCCESS = 0x0000
#: Refused: out of resources — free disk below ``storage.min_free_bytes`` (PS3.4 B.2.3).
OUT_OF_RESOURCES = 0xA700
#: Refused: out of resources — the instance could not be written or committed (I/O or database error).
OUT_OF_RESOURCES_STORE_FAILED = 0xA701
#: Refused: out of resources — the instance is larger than ``dicom.max_instance_bytes``.
INSTANCE_TOO_LARGE = 0xA702
#: Error: data set does not match SOP class (dataset SOP class differs from the C-STORE request's).
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
#: Error: cannot understand — the dataset could not be parsed.
CANNOT_UNDERSTAND = 0xC000
#: Error: cannot understand — a UID (SOP instance, series, study) is missing or invalid.
CANNOT_UNDERSTAND_INVALID_UID = 0xC001
#: Failure: SOP class not supported (not in the accepted storage classes).
SOP_CLASS_NOT_SUPPORTED = 0x0122
#: Failure: the receiver is shutting down.
PROCESSING_FAILURE = 0x0110

NAMES = {
    SUCCESS: "success",
    OUT_OF_RESOURCES: "out_of_resources",
    OUT_OF_RESOURCES_STORE_FAILED: "store_failed",
    INSTANCE_TOO_LARGE: "instance_too_large",
    DATASET_DOES_NOT_MATCH_SOP_CLASS: "sop_class_mismatch",
    CANNOT_UNDERSTAND: "cannot_understand",
    CANNOT_UNDERSTAND_INVALID_UID: "invalid_uid",
    SOP_CLASS_NOT_SUPPORTED: "sop_class_not_supported",
    PROCESSING_FAILURE: "processing_failure",
}


def status_name(status: int) -> str:
    """Stable snake_case name of ``status`` for logs and metrics labels."""
    return NAMES.get(status, f"0x{status:04X}")


def failure(status: int, comment: str) -> Dataset:
    """A C-STORE response status Dataset with an ErrorComment (LO: at most 64 characters)."""
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = comment[:64]
    return ds
