"""One rooted hierarchy for operational errors.

Each class says whether retrying can help, so workers decide from the type, never from message text.
"""

from __future__ import annotations


class TriagedError(Exception):
    """Base of every operational error raised by triaged."""

    retryable: bool = False

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or self.__class__.__name__).strip())


class ConfigError(TriagedError):
    """The configuration is invalid."""


class StoreError(TriagedError):
    """A received instance could not be stored durably."""

    retryable = True


class OutOfSpaceError(StoreError):
    """Free disk space is below the configured threshold."""


class InvalidUidError(TriagedError, ValueError):
    """A DICOM UID is not valid (at most 64 characters of digits and dots)."""


class SchemaOutdatedError(TriagedError):
    """The database schema is not at the version this code needs."""


class DicomSendError(TriagedError):
    """A C-STORE to a peer failed."""

    retryable = True

    def __init__(self, message: str | None = None, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class DicomPeerError(DicomSendError):
    """The peer could not be reached or refused the association."""


class DestinationDownError(TriagedError):
    """The destination did not answer (refused, timed out, rejected the association): wait for it, spend nothing.

    Not a failure of the job: the worker gives the attempt back and the job waits until a probe finds the
    destination up again (:mod:`triaged.outputs.destinations`).
    """

    retryable = True

    def __init__(self, message: str | None = None, *, destination: str) -> None:
        super().__init__(message)
        self.destination = destination


class Hl7SendError(TriagedError):
    """An HL7 receiver answered and did not accept a message (ACK code AE, AR, CE or CR): spends an attempt."""

    retryable = True

    def __init__(self, message: str | None = None, *, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class PixelDecodeError(TriagedError):
    """The pixel data of an instance cannot become 2-D brain slices."""


class InferenceError(TriagedError):
    """Inference failed for a reason a retry might fix (e.g. out of memory)."""

    retryable = True


class ModelError(TriagedError):
    """The model directory is missing, corrupt or does not match its checksum."""


class OutputBuildError(TriagedError):
    """A DICOM output object could not be built."""


class JobError(TriagedError):
    """A job could not run; `retryable` is set per instance."""

    def __init__(self, message: str | None = None, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class NotFoundError(TriagedError):
    """A series, study, job or result asked for does not exist."""
