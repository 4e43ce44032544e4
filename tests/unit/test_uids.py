"""UID validation and hashed storage paths: a hostile UID must never become a path."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from triaged.dicom.uids import uid_path, validate_uid
from triaged.errors import InvalidUidError


@pytest.mark.parametrize(
    "uid",
    ["1.2.840.10008.5.1.4.1.1.4", "0", "1.0.2", "2.25." + "9" * 59, "1.2.3\x00"],
)
def test_valid_uids_pass(uid: str) -> None:
    assert validate_uid(uid) == uid.rstrip("\x00")


@pytest.mark.parametrize(
    "uid",
    [
        "",
        "../../etc",
        "1.2/3",
        "1.02.3",
        "1..2",
        ".1.2",
        "1.2.",
        "1.2.a",
        "2.25." + "9" * 61,
        "1.2 .3",
        "1.2\x003",
        "\u0661.2",
    ],
)
def test_invalid_uids_raise(uid: str) -> None:
    with pytest.raises(InvalidUidError):
        validate_uid(uid)


def test_invalid_uid_error_is_value_error() -> None:
    with pytest.raises(ValueError):
        validate_uid("../../etc/passwd")


def test_uid_path_is_sha256_fanout() -> None:
    uid = "1.2.840.113619.2.55.3"
    digest = hashlib.sha256(uid.encode()).hexdigest()
    assert uid_path(uid) == f"{digest[:2]}/{digest}.dcm"
    assert uid_path(uid, ".npy").endswith(".npy")


def test_uid_path_rejects_traversal() -> None:
    with pytest.raises(InvalidUidError):
        uid_path("../../etc")


@given(st.text(max_size=80))
def test_any_text_is_either_rejected_or_safe(text: str) -> None:
    try:
        path = uid_path(text)
    except InvalidUidError:
        return
    assert ".." not in path
    assert not path.startswith("/")
    assert len(path.split("/")) == 2
