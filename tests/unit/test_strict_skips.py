"""CI must fail on skips (TRIAGED_STRICT_SKIPS=1); a user's clone without ../shared just skips."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_probe_skip() -> None:
    if os.environ.get("TRIAGED_SKIP_PROBE") == "1":
        pytest.skip("needs something this probe pretends is missing")


@pytest.mark.parametrize(("strict", "expected_rc"), [("0", 0), ("1", 1)])
def test_skips_fail_only_when_strict(strict: str, expected_rc: int) -> None:
    env = {**os.environ, "TRIAGED_SKIP_PROBE": "1", "TRIAGED_STRICT_SKIPS": strict}
    completed = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", f"{__file__}::test_probe_skip"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == expected_rc, completed.stdout
    assert ("skip not allowed in CI" in completed.stdout) == (strict == "1")
