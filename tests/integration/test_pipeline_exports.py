"""Which results get an export job (settings.outputs.mode / not_assessable)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from triaged.config import Settings
from triaged.db.models import Result, ResultStatus


@pytest.mark.parametrize(
    ("mode", "not_assessable", "status", "urgent", "expected"),
    [
        ("all", "none", ResultStatus.ASSESSED, False, True),
        ("all", "none", ResultStatus.ASSESSED, True, True),
        ("all", "none", ResultStatus.NOT_ASSESSABLE, False, False),
        ("all", "sr", ResultStatus.NOT_ASSESSABLE, False, True),
        ("urgent", "none", ResultStatus.ASSESSED, False, False),
        ("urgent", "none", ResultStatus.ASSESSED, True, True),
        ("urgent", "sr", ResultStatus.NOT_ASSESSABLE, False, False),
        ("none", "sr", ResultStatus.ASSESSED, True, False),
        ("none", "sr", ResultStatus.NOT_ASSESSABLE, False, False),
    ],
)
def test_should_export(  # noqa: PLR0917 - pytest parameters
    make_settings: Callable[..., Settings],
    mode: str,
    not_assessable: str,
    status: ResultStatus,
    urgent: bool,
    expected: bool,
) -> None:
    from triaged.pipeline import should_export

    settings = make_settings(outputs={"mode": mode, "not_assessable": not_assessable})
    assert should_export(settings, Result(status=status, urgent=urgent)) is expected
