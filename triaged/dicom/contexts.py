"""SOP classes, transfer syntaxes and pynetdicom's process-global switches, in one place.

pynetdicom's ``_config`` is module state (style P2/A1): :func:`configure_pynetdicom` is called once by the
composition root, and tests restore the previous values with :func:`pynetdicom_config`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    EnhancedMRImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    MRImageStorage,
    RLELossless,
)
from pynetdicom import _config
from pynetdicom.presentation import PresentationContext, build_context

from triaged.receive import reactor

#: Image storage classes the pipeline can assess (others may be received and are then skipped).
MR_IMAGE_SOP_CLASSES: tuple[str, ...] = (MRImageStorage, EnhancedMRImageStorage)
VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"

#: Every standard transfer syntax an MR image may arrive in; receiving never decodes, so all are accepted.
#: Order matters only as a tie-break: pynetdicom's acceptor takes the requestor's first acceptable one.
ACCEPTED_TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)

# The switches we own, with the values the receiver and sender need.
_SWITCHES: dict[str, object] = {
    # Our C-STORE handler takes the encoded dataset as received (no decode); the chunked-to-temp-file mode
    # is off because it creates a NamedTemporaryFile per instance in $TMPDIR (another filesystem, ~8 % CPU).
    "STORE_RECV_CHUNKED_DATASET": False,
    # Sending a file path streams its dataset bytes unchanged (exact transfer syntax, no re-encode).
    "STORE_SEND_CHUNKED_DATASET": True,
    # Never log identifiers from pynetdicom's handlers (PHI).
    "LOG_REQUEST_IDENTIFIERS": False,
    "LOG_RESPONSE_IDENTIFIERS": False,
    # Reject datasets whose UIDs pynetdicom considers invalid? No: we validate and answer ourselves.
    "ENFORCE_UID_CONFORMANCE": False,
}


def configure_pynetdicom() -> dict[str, object]:
    """Set pynetdicom's global switches for triaged; return the previous values (for restoring).

    Also replaces pynetdicom's 1 ms polling loops by event-driven ones (:mod:`triaged.receive.reactor`); that
    one is process-wide for good, and is not undone by :func:`restore_pynetdicom`.
    """
    reactor.install()
    previous = {name: getattr(_config, name) for name in _SWITCHES}
    for name, value in _SWITCHES.items():
        setattr(_config, name, value)
    return previous


def restore_pynetdicom(previous: dict[str, object]) -> None:
    for name, value in previous.items():
        setattr(_config, name, value)


@contextmanager
def pynetdicom_config() -> Iterator[None]:
    """Apply :func:`configure_pynetdicom` for the duration of a block (tests)."""
    previous = configure_pynetdicom()
    try:
        yield
    finally:
        restore_pynetdicom(previous)


def storage_sop_classes(extra: Iterable[str] = ()) -> tuple[str, ...]:
    """MR and Enhanced MR plus configured extra storage classes, without duplicates."""
    seen: dict[str, None] = dict.fromkeys(MR_IMAGE_SOP_CLASSES)
    for uid in extra:
        seen.setdefault(str(UID(uid)), None)
    return tuple(seen)


def scp_contexts(extra_sop_classes: Iterable[str] = ()) -> list[PresentationContext]:
    """Supported presentation contexts of the receiver: Verification and each storage class × all syntaxes."""
    contexts = [build_context(VERIFICATION_SOP_CLASS)]
    contexts += [build_context(uid, list(ACCEPTED_TRANSFER_SYNTAXES)) for uid in storage_sop_classes(extra_sop_classes)]
    return contexts
