"""`triaged series list` and `series show`, including result rows, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from typer.testing import CliRunner

from tests.support.receiver import receiver_settings, running_receiver, send, synthetic_series, wait_for
from triaged.cli.app import app
from triaged.db.models import Association, Result, ResultStatus, Series
from triaged.receive.series import sweep_complete_series

runner = CliRunner()


def _config(tmp_path: Path, db_url: str) -> Path:
    config = tmp_path / "triaged.toml"
    config.write_text(f'data_dir = "{tmp_path / "cli"}"\nlog_level = "warning"\n[database]\nurl = "{db_url}"\n')
    return config


def test_series_list_and_show(tmp_path, db_url, make_settings, session_factory):
    settings = receiver_settings(make_settings, series={"quiet_seconds": 0.5})
    paths = synthetic_series(tmp_path / "a", 3, seed=1)
    ct = synthetic_series(tmp_path / "b", 1, seed=2, modality="CT")
    with running_receiver(settings, session_factory) as receiver:
        assert all(r.ok for r in send(receiver, paths + ct, calling_ae="PACS1"))

        def closed() -> bool:
            with session_factory() as session:
                return all(a.closed_at is not None for a in session.query(Association))

        wait_for(closed)
    assert len(sweep_complete_series(session_factory, settings, now=datetime.now(UTC) + timedelta(seconds=1))) == 2
    with session_factory.begin() as session:
        mr = session.query(Series).filter(Series.modality == "MR").one()
        session.add(
            Result(
                series_id=mr.id,
                generation=1,
                model_name="densenet121-brainmri",
                model_version="1.0",
                model_sha256="0" * 64,
                status=ResultStatus.ASSESSED,
                label="meningioma",
                urgency=0.91,
                urgent=True,
            )
        )
        mr_uid = mr.series_instance_uid
    config = _config(tmp_path, db_url)

    result = runner.invoke(app, ["--config", str(config), "series", "list", "--json"])
    assert result.exit_code == 0, result.output
    listed = {s["modality"]: s for s in json.loads(result.output)}
    assert listed["MR"]["state"] == "queued" and listed["MR"]["instance_count"] == 3
    assert listed["CT"]["state"] == "skipped" and listed["CT"]["skip_reason"] == "modality CT is not MR"
    result = runner.invoke(app, ["--config", str(config), "series", "list", "--state", "skipped"])
    assert result.exit_code == 0
    assert "skipped" in result.output and "queued" not in result.output

    result = runner.invoke(app, ["--config", str(config), "series", "show", mr_uid, "--json"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert shown["calling_ae_title"] == "PACS1"
    assert shown["instances"] == [
        {
            "sop_class_uid": "1.2.840.10008.5.1.4.1.1.4",
            "transfer_syntax_uid": "1.2.840.10008.1.2.1",
            "count": 3,
            "bytes": shown["instances"][0]["bytes"],
        }
    ]
    assert [j["kind"] for j in shown["jobs"]] == ["infer"]
    (res,) = shown["results"]
    assert (res["label"], res["urgency"], res["urgent"], res["model"], res["status"]) == (
        "meningioma",
        0.91,
        True,
        "densenet121-brainmri 1.0",
        "assessed",
    )
    assert res["created_at"]
    result = runner.invoke(app, ["--config", str(config), "series", "show", mr_uid])
    assert result.exit_code == 0
    assert "meningioma" in result.output and "0.910" in result.output and "yes" in result.output

    result = runner.invoke(app, ["--config", str(config), "series", "show", "1.2.3.4"])
    assert result.exit_code == 1
    assert "no series with SeriesInstanceUID 1.2.3.4" in result.output
