"""`triaged echo` and `triaged send` against the real receiver: per-file statuses, exit codes, --json."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pydicom
import pytest
from typer.testing import CliRunner

from tests.support.receiver import instance_rows, receiver_settings, running_receiver, synthetic_series
from triaged.cli.app import app
from triaged.outputs.send import DicomFile, _batches

runner = CliRunner()


def _config(tmp_path: Path, db_url: str, port: int, **dicom: str) -> Path:
    config = tmp_path / "triaged.toml"
    extra = "".join(f'{k} = "{v}"\n' for k, v in dicom.items())
    config.write_text(
        f'data_dir = "{tmp_path / "cli-data"}"\nlog_level = "warning"\n[database]\nurl = "{db_url}"\n'
        f'[dicom]\nae_title = "CLIENT"\n{extra}'
        f'[dicom.peers.local]\nae_title = "TRIAGED"\nhost = "127.0.0.1"\nport = {port}\n'
    )
    return config


# pynetdicom 3.0 shuts down but never closes a requestor socket whose connect() was refused (transport.py,
# AssociationSocket.connect): the ResourceWarning surfaces at garbage collection.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_echo_by_peer_name_and_literal(tmp_path, db_url, make_settings, session_factory):
    settings = receiver_settings(make_settings)
    with running_receiver(settings, session_factory) as receiver:
        config = _config(tmp_path, db_url, receiver.port)
        result = runner.invoke(app, ["--config", str(config), "echo", "local"])
        assert result.exit_code == 0, result.output
        assert "C-ECHO 0x0000" in result.output
        result = runner.invoke(app, ["--config", str(config), "echo", f"TRIAGED@127.0.0.1:{receiver.port}", "--json"])
        assert result.exit_code == 0
        assert json.loads(result.output)["ok"] is True
    result = runner.invoke(app, ["--config", str(config), "echo", "nosuchpeer"])
    assert result.exit_code == 1
    assert "unknown peer 'nosuchpeer'" in result.output
    result = runner.invoke(app, ["--config", str(config), "echo", "local", "--timeout", "2"])
    assert result.exit_code == 1  # receiver stopped: one-line error, no traceback
    assert "Traceback" not in result.output
    gc.collect()  # surface the leaked socket's warning here, under this test's filter


def test_send_folder_reports_each_file(tmp_path, db_url, make_settings, session_factory):
    paths = synthetic_series(tmp_path / "src" / "a", 3, seed=1)
    synthetic_series(tmp_path / "src" / "b", 2, seed=2, transfer_syntax_uid="1.2.840.10008.1.2.4.80")
    (tmp_path / "src" / "notes.txt").write_text("not DICOM")
    settings = receiver_settings(make_settings)
    with running_receiver(settings, session_factory) as receiver:
        config = _config(tmp_path, db_url, receiver.port)
        result = runner.invoke(app, ["--config", str(config), "send", str(tmp_path / "src"), "--to", "local", "--json"])
        assert result.exit_code == 1, result.output  # the text file is reported as a failure
        data = json.loads(result.output)
        assert len(data) == 6
        ok = [d for d in data if d["ok"]]
        assert len(ok) == 5 and all(d["status_hex"] == "0x0000" for d in ok)
        (bad,) = [d for d in data if not d["ok"]]
        assert bad["path"].endswith("notes.txt") and "not a DICOM file" in bad["error"]
        result = runner.invoke(app, ["--config", str(config), "send", str(paths[0]), "--to", "local"])
        assert result.exit_code == 0, result.output
        assert result.output.startswith("OK      0x0000")
        assert "1 of 1 stored" in result.output
    rows = instance_rows(session_factory)
    assert len(rows) == 5
    assert {r.transfer_syntax_uid for r in rows} == {"1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.80"}


def test_send_shows_failure_statuses(tmp_path, db_url, make_settings, session_factory):
    paths = synthetic_series(tmp_path / "src", 2)
    settings = receiver_settings(make_settings, storage={"min_free_bytes": 1 << 60})
    with running_receiver(settings, session_factory) as receiver:
        config = _config(tmp_path, db_url, receiver.port)
        result = runner.invoke(app, ["--config", str(config), "send", *map(str, paths), "--to", "local"])
    assert result.exit_code == 1
    assert result.output.count("FAILED  0xA700") == 2
    assert "out_of_resources" in result.output
    assert "0 of 2 stored" in result.output


def test_send_preserves_dataset_bytes_and_splits_over_128_contexts(tmp_path):
    files = [DicomFile(tmp_path / f"{i}", f"1.2.{i}", f"1.3.{i}", "1.2.840.10008.1.2.1") for i in range(300)]
    batches = list(_batches(files))
    assert [len(b) for b in batches] == [128, 128, 44]
    assert all(len({(f.sop_class_uid, f.transfer_syntax_uid) for f in b}) <= 128 for b in batches)
    ds = pydicom.dcmread(synthetic_series(tmp_path / "x", 1)[0])
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
