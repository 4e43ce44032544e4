"""UID validation and UID-derived storage paths (design: Receiving).

Paths never contain raw UID text: a received UID such as ``../../etc`` is rejected by
:func:`validate_uid`, and even a valid UID only ever reaches the filesystem as a sha256 digest.
"""

from __future__ import annotations

import hashlib
import re

from triaged.errors import InvalidUidError

MAX_UID_LENGTH = 64
# PS3.5 section 9.1: components of digits separated by dots, no leading zero unless the component is "0".
_UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def validate_uid(uid: str) -> str:
    """Return ``uid`` unchanged if it is a valid DICOM UID, else raise :class:`InvalidUidError`.

    Trailing NUL padding (PS3.5 section 9.1, even-length UI values) is stripped first.

    >>> validate_uid("1.2.840.10008.5.1.4.1.1.4")
    '1.2.840.10008.5.1.4.1.1.4'
    """
    if not isinstance(uid, str):
        raise InvalidUidError(f"UID must be a string, got {type(uid).__name__}")
    value = uid.rstrip("\x00").strip(" ")
    if not value:
        raise InvalidUidError("UID is empty")
    if len(value) > MAX_UID_LENGTH:
        raise InvalidUidError(f"UID is longer than {MAX_UID_LENGTH} characters")
    if not _UID_PATTERN.match(value):
        raise InvalidUidError("UID must be digits separated by dots, without leading zeros in components")
    return value


def uid_digest(uid: str) -> str:
    """sha256 hex digest of a validated UID."""
    return hashlib.sha256(validate_uid(uid).encode("ascii")).hexdigest()


def uid_path(uid: str, suffix: str = ".dcm") -> str:
    """Relative storage path for ``uid``: ``ab/<sha256>.dcm``.

    One fan-out level of 256 directories, created once by the store: a new file then never needs a new
    directory (each new directory costs a mkdir and an fsync of its parent on the hot path), and 256
    directories keep each one small enough (~4,000 entries per million instances).

    >>> uid_path("1.2.3")[:3]
    'c4/'
    """
    digest = uid_digest(uid)
    return f"{digest[:2]}/{digest}{suffix}"
