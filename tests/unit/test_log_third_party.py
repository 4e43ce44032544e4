"""No raw UID from a library reaches the log, even at log_level = debug (highdicom copies log them at INFO)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import structlog

from tests.unit.test_outputs import _keys, _phantom, _summary
from triaged.config import OutputSettings
from triaged.dicom.synthetic import write_mr_series
from triaged.log import configure_logging
from triaged.outputs.build import build_outputs


def test_building_outputs_at_debug_level_logs_no_source_uid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import pydicom

    paths = write_mr_series([_phantom(i) for i in range(5)], tmp_path / "src", seed="uids")
    source = [pydicom.dcmread(p) for p in paths]
    configure_logging("debug", "json")
    try:
        build_outputs(_summary(source[0]), _keys(source), source, OutputSettings(series_number=9900))
        err = capsys.readouterr().err
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
        logging.getLogger().setLevel(logging.WARNING)
    uids = {str(ds.SOPInstanceUID) for ds in source} | {str(source[0].StudyInstanceUID)}
    assert not [uid for uid in uids if uid in err]
