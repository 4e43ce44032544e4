from __future__ import annotations

from pathlib import Path

import pytest

from triaged.config import load_settings
from triaged.errors import ConfigError


def test_defaults_work_without_a_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("TRIAGED_CONFIG", raising=False)
    settings = load_settings(None, data_dir=tmp_path)
    assert settings.dicom.ae_title == "TRIAGED"
    assert settings.dicom.port == 11112
    assert settings.series.quiet_seconds == 5.0
    assert settings.database_url == f"sqlite:///{tmp_path / 'triaged.db'}"
    assert settings.storage_dir == tmp_path / "storage"


def test_file_then_env_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "triaged.toml"
    config.write_text(
        '[dicom]\nport = 2000\nae_title = "FILEAE"\n[dicom.peers.pacs]\nae_title = "ORTHANC"\nport = 4242\n'
    )
    monkeypatch.setenv("TRIAGED_DICOM__PORT", "3000")
    settings = load_settings(config)
    assert settings.dicom.port == 3000
    assert settings.dicom.ae_title == "FILEAE"
    assert settings.dicom.peer_for_ae("ORTHANC") is not None
    assert settings.dicom.peers["pacs"].port == 4242


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[dicom]\nport = 70000\n", "dicom.port"),
        ("[dicom]\nport = -1\n", "dicom.port"),
        ('[dicom]\nae_title = "THIS_AE_TITLE_IS_TOO_LONG"\n', "dicom.ae_title"),
        ("[series]\nquiet_seconds = -1\n", "series.quiet_seconds"),
        ("[dicom]\nprot = 1\n", "dicom.prot"),
        ("[dicom.tls]\nenabled = true\n", "dicom.tls"),
    ],
)
def test_invalid_values_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(config)
    message = str(info.value)
    assert message.startswith(f"config error: {key}")
    assert "\n" not in message


def test_port_zero_and_testing_hold_file(tmp_path: Path) -> None:
    defaults = load_settings(None)
    assert defaults.worker.hold_file is None  # production never holds jobs
    config = tmp_path / "test.toml"
    config.write_text(f'[dicom]\nport = 0\n[worker]\nhold_file = "{tmp_path / "go"}"\n')
    settings = load_settings(config)
    assert settings.dicom.port == 0  # the receiver binds any free port and announces it
    assert settings.worker.hold_file == tmp_path / "go"


def test_missing_and_unparseable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_settings(tmp_path / "nope.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[dicom\n")
    with pytest.raises(ConfigError, match=r"broken\.toml"):
        load_settings(broken)
