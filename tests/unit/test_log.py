from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import structlog

from triaged.log import configure_logging, uid_hash


def test_uid_hash_is_stable_short_and_not_the_uid() -> None:
    uid = "1.2.840.113619.2.55.3.604688119.969.1268071029.320"
    digest = uid_hash(uid)
    # stable across processes, hosts and releases, so log lines of one series can be joined: a pinned value
    # (the first 12 hex digits of SHA-256), which a per-process salted hash() or a changed digest would break
    assert digest == "d1a63710939a"
    child = subprocess.run(
        [sys.executable, "-c", f"from triaged.log import uid_hash; print(uid_hash({uid!r}))"],
        env={**os.environ, "PYTHONHASHSEED": "12345"},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert child.stdout.strip() == digest
    assert len(digest) == 12 and set(digest) <= set("0123456789abcdef")
    assert uid not in digest
    assert uid_hash("1.2.3") != uid_hash("1.2.4")
    assert uid_hash(None) == "-"


def test_json_output_routes_stdlib_loggers(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "json")
    try:
        structlog.get_logger().info("store_received", series=uid_hash("1.2.3"), size=10)
        logging.getLogger("triaged.somewhere").warning("plain %s", "message")
        logging.getLogger("pynetdicom").info("pdu dump with identifiers")  # kept at WARNING
        lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.strip()]
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
    events = [line["event"] for line in lines]
    assert events == ["store_received", "plain message"]
    assert lines[0]["series"] == uid_hash("1.2.3")
    assert lines[0]["level"] == "info"
    assert "timestamp" in lines[0]
    assert lines[1]["level"] == "warning"
