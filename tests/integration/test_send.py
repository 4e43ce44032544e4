"""`triaged echo` and `triaged send` against the real receiver: per-file statuses, exit codes, --json."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pydicom
import pytest
from typer.testing import CliRunner

from tests.support.dicom_files import SYNTHETIC_SYNTAXES
from tests.support.receiver import (
    dataset_bytes,
    instance_rows,
    receiver_settings,
    running_receiver,
    synthetic_series,
)
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


# Real files whose dataset has group-length elements (gggg,0000): pynetdicom drops those when it decodes and
# re-encodes a file (field notes), so these arrive changed unless the dataset bytes are streamed as they are.
GROUP_LENGTH_FILES = (
    "neurolabusc_dcm_qa_nih/In/20180918GE/mr_0004/axial_epi_fmri_interleaved_i_to_s-00001.dcm",
    "neurolabusc_dcm_qa_nih/In/20180918GE/mr_0004/axial_epi_fmri_interleaved_i_to_s-00002.dcm",
    "pydicom_pylibjpeg-data/ljdata/ds/JPEGLossless/JPEGLossless_1s_1f_u_16_12.dcm",
)


def _has_group_length(path: Path) -> bool:
    return any(e.tag.element == 0 and e.tag.group != 2 for e in pydicom.dcmread(path, stop_before_pixels=True))


def test_send_streams_every_files_dataset_bytes_unchanged(
    tmp_path, db_url, make_settings, session_factory, shared_data_dir
):
    """What `triaged send` puts on the wire is the file's dataset, byte for byte, in every transfer syntax.

    The receiver stores the bytes it received (tests/integration/test_receiver_shared_data.py), so the stored
    file's dataset equals the source's only if the sender neither decoded nor re-encoded it.
    """
    sources = [shared_data_dir / "dicom" / name for name in GROUP_LENGTH_FILES]
    assert all(_has_group_length(path) for path in sources)  # the inputs that a re-encoding sender changes
    for index, syntax in enumerate(SYNTHETIC_SYNTAXES):
        sources += synthetic_series(tmp_path / "src" / f"s{index}", 2, seed=index, transfer_syntax_uid=syntax)
    settings = receiver_settings(make_settings)
    with running_receiver(settings, session_factory) as receiver:
        config = _config(tmp_path, db_url, receiver.port)
        result = runner.invoke(app, ["--config", str(config), "send", *map(str, sources), "--to", "local", "--json"])
    assert result.exit_code == 0, result.output
    assert [d["status_hex"] for d in json.loads(result.output)] == ["0x0000"] * len(sources)
    stored = {row.sop_instance_uid: settings.storage_dir / row.file_path for row in instance_rows(session_factory)}
    assert len(stored) == len(sources)
    for path in sources:
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert dataset_bytes(stored[uid]) == dataset_bytes(path), path.name
    syntaxes = {pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID for p in stored.values()}
    assert syntaxes >= set(SYNTHETIC_SYNTAXES)  # each file kept its own transfer syntax


def test_send_splits_over_128_contexts(tmp_path):
    files = [DicomFile(tmp_path / f"{i}", f"1.2.{i}", f"1.3.{i}", "1.2.840.10008.1.2.1") for i in range(300)]
    batches = list(_batches(files))
    assert [len(b) for b in batches] == [128, 128, 44]
    assert all(len({(f.sop_class_uid, f.transfer_syntax_uid) for f in b}) <= 128 for b in batches)
