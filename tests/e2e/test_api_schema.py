"""Schemathesis against the JSON API's own OpenAPI document, on the daemon that triaged real series.

A bounded run (the coverage phase's boundary cases plus five fuzzed examples per operation, fixed seed): no
request may end in a 5xx, and every response must match the status codes, content types and schemas the
document declares. The series-detail and image routes get the UIDs of real objects (so their full responses
are checked, not only 404s). It runs as a viewer: schemathesis reuses UIDs and ids it read from responses,
so with an admin token it would reprocess and resend the real series under the browser tests' feet; the
admin actions are checked for their 403 here and exercised in tests/integration/test_web_api.py.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.console_stack import ConsoleStack

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
CHECKS = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _config(stack: ConsoleStack) -> str:
    """schemathesis.toml: real UIDs for the two read routes whose random UIDs would only ever be 404."""
    return (
        "[[operations]]\n"
        'include-name = "GET /api/v1/outputs/{sop_instance_uid}/image.png"\n'
        f'parameters = {{ "path.sop_instance_uid" = "{stack.sc_uid}" }}\n\n'
        "[[operations]]\n"
        'include-name = "GET /api/v1/series/{series_instance_uid}"\n'
        f'parameters = {{ "path.series_instance_uid" = "{stack.urgent_uid}" }}\n'
    )


def test_api_matches_its_openapi_document(console_stack: ConsoleStack, tmp_path: Path) -> None:
    (tmp_path / "schemathesis.toml").write_text(_config(console_stack), encoding="utf-8")
    run = subprocess.run(
        [
            str(SCHEMATHESIS),
            "run",
            f"{console_stack.base_url}/api/v1/openapi.json",
            "--header",
            f"Authorization: Bearer {console_stack.viewer_token}",
            "--checks",
            CHECKS,
            "--phases",
            "examples,coverage,fuzzing",
            "--max-examples",
            "5",
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
    # every generated case passed every check, on every operation of the document (the viewer's 403s on the
    # admin actions are expected and only a warning)
    counted = re.search(r"(\d+) generated, (\d+) passed\n", run.stdout)
    assert counted is not None and counted.group(1) == counted.group(2), run.stdout[-3000:]
    operations = re.search(r"Operations:\s+(\d+) selected / (\d+) total", run.stdout)
    assert operations is not None and operations.group(1) == operations.group(2), run.stdout[-3000:]
    assert int(operations.group(2)) >= 11, "the API lost operations"  # 11 with /api/v1/receivers
    assert f"Tested: {operations.group(2)}" in run.stdout, run.stdout[-3000:]
