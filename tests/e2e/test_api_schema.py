"""Schemathesis against the JSON API's own OpenAPI document, on the daemon that triaged real series.

A bounded run (few examples per operation, fixed seed): no request may end in a 5xx, and every response
must match the status codes, content types and schemas the document declares. Run with an admin token so
the admin actions are exercised too (random UIDs and job ids: 404s, never a change to real series).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.console_stack import ConsoleStack

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_api_matches_its_openapi_document(console_stack: ConsoleStack, tmp_path: Path) -> None:
    run = subprocess.run(
        [
            str(SCHEMATHESIS),
            "run",
            f"{console_stack.base_url}/api/v1/openapi.json",
            "--header",
            f"Authorization: Bearer {console_stack.admin_token}",
            "--checks",
            CHECKS,
            "--phases",
            "examples,coverage,fuzzing",
            "--max-examples",
            "15",
            "--seed",
            "20261201",
            "--workers",
            "1",
            "--request-timeout",
            "30",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=540,
        cwd=tmp_path,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "No issues found" in run.stdout or " passed" in run.stdout, run.stdout[-3000:]
