"""Configuration of DICOMweb and HL7 destinations: user mistakes are one clear line, secrets are never shown."""

from __future__ import annotations

import pytest

from triaged.config import load_settings
from triaged.errors import ConfigError

WEB = {"url": "https://pacs.example/dicom-web"}


def test_basic_auth_needs_username_and_password() -> None:
    with pytest.raises(ConfigError, match=r"outputs\.dicomweb\.web.*needs username and password"):
        load_settings(None, outputs={"dicomweb": {"web": {**WEB, "auth": "basic", "username": "u"}}})


def test_bearer_auth_needs_a_token() -> None:
    with pytest.raises(ConfigError, match="needs token"):
        load_settings(None, outputs={"dicomweb": {"web": {**WEB, "auth": "bearer"}}})


def test_the_url_must_be_http_or_https() -> None:
    with pytest.raises(ConfigError, match=r"outputs\.dicomweb\.web\.url"):
        load_settings(None, outputs={"dicomweb": {"web": {"url": "ftp://pacs.example"}}})


def test_a_destination_name_means_one_destination() -> None:
    with pytest.raises(ConfigError, match=r"'pacs' is used in both dicom\.peers and outputs\.dicomweb"):
        load_settings(None, dicom={"peers": {"pacs": {"ae_title": "PACS"}}}, outputs={"dicomweb": {"pacs": WEB}})
    with pytest.raises(ConfigError, match=r"'ris' is used in both outputs\.dicomweb and notify"):
        load_settings(None, outputs={"dicomweb": {"ris": WEB}}, notify={"ris": {"port": 2575}})


def test_secrets_are_masked_in_the_settings() -> None:
    settings = load_settings(
        None,
        outputs={"dicomweb": {"web": {**WEB, "auth": "basic", "username": "u", "password": "hunter2"}}},
    )
    assert "hunter2" not in repr(settings) and "hunter2" not in str(settings.model_dump())
    password = settings.outputs.dicomweb["web"].password
    assert password is not None and password.get_secret_value() == "hunter2"
