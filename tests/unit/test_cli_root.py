"""The CLI shell: help, version, config errors as one line, schema guard; plus a `python -m triaged` smoke test."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from triaged import __version__
from triaged.cli.app import app

runner = CliRunner()


def test_version_and_help() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"triaged {__version__}"
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "db" in result.output


def test_invalid_config_is_one_line_error(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[dicom]\nport = -1\n")  # 0 is valid: any free port
    result = runner.invoke(app, ["--config", str(config), "db", "status"])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "error: config error: dicom.port: Input should be greater than or equal to 0"
    ]
    assert "Traceback" not in result.output


def test_db_upgrade_then_status(tmp_path: Path) -> None:
    env = {"TRIAGED_DATA_DIR": str(tmp_path)}
    result = runner.invoke(app, ["db", "status"], env=env)
    assert result.exit_code == 1
    assert "triaged db upgrade" in result.output
    result = runner.invoke(app, ["db", "upgrade"], env=env)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "triaged.db").is_file()
    result = runner.invoke(app, ["db", "status"], env=env)
    assert result.exit_code == 0
    assert "up to date" in result.output


def test_python_dash_m_smoke(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "triaged", "--version"], capture_output=True, text=True, timeout=120, check=False
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == f"triaged {__version__}"
