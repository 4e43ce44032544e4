"""Settings: one TOML file plus ``TRIAGED_…`` environment overrides, validated once at start.

The composition root (CLI callback or daemon) calls :func:`load_settings` and passes the frozen object
down; nothing else reads the environment (style P2). Nested keys are overridden with a double
underscore, e.g. ``TRIAGED_DICOM__PORT=11113``.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from triaged.errors import ConfigError

CONFIG_ENV_VAR = "TRIAGED_CONFIG"
_AE_TITLE = re.compile(r"^[ -~]{1,16}$")
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL_DIR = REPO_ROOT / "models" / "densenet121-brainmri-v2"


def _default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "triaged"


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _check_ae_title(value: str) -> str:
    stripped = value.strip()
    if not _AE_TITLE.match(stripped) or "\\" in stripped:
        raise ValueError("must be 1-16 printable ASCII characters without backslash")
    return stripped


class PeerTls(_Section):
    """TLS for associations *we* open to a peer (outputs, probes): the peer's certificate is verified."""

    enabled: bool = False
    ca_file: Path | None = Field(default=None, description="CA that signed the peer's certificate (default: system)")
    cert_file: Path | None = Field(default=None, description="our client certificate, when the peer requires one")
    key_file: Path | None = None
    check_hostname: bool = Field(default=False, description="peers are addressed by IP; the CA file pins them")

    @model_validator(mode="after")
    def _key_with_cert(self) -> PeerTls:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


class Peer(_Section):
    """A DICOM node we accept associations from and may send outputs to."""

    ae_title: str
    host: str = "127.0.0.1"
    port: int = Field(default=104, ge=1, le=65535)
    quiet_seconds: float | None = Field(default=None, ge=0)
    tls: PeerTls = PeerTls()

    _ae = field_validator("ae_title")(_check_ae_title)


class TlsSettings(_Section):
    enabled: bool = False
    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None
    require_client_cert: bool = False

    @model_validator(mode="after")
    def _files_when_enabled(self) -> TlsSettings:
        if self.enabled and (self.cert_file is None or self.key_file is None):
            raise ValueError("cert_file and key_file are required when TLS is enabled")
        if self.require_client_cert and self.ca_file is None:
            raise ValueError("ca_file is required when require_client_cert is true")
        return self


class DicomSettings(_Section):
    ae_title: str = "TRIAGED"
    bind_address: str = "0.0.0.0"
    port: int = Field(default=11112, ge=0, le=65535, description="0 = any free port (announced at start)")
    max_associations: int = Field(default=32, ge=1, description="in total, over all receiver processes")
    max_connections_per_address: int = Field(
        default=32, ge=1, description="open TCP connections from one peer address, associated or not"
    )
    receiver_processes: int = Field(default=1, ge=1, description=">1: processes sharing the port (SO_REUSEPORT)")
    max_pdu_size: int = Field(
        default=1 << 20,
        ge=0,
        description="largest PDU we accept (advertised); 0 = unlimited, which lets one PDU hold a whole instance",
    )
    max_instance_bytes: int = Field(default=4 << 30, ge=1, description="larger C-STOREs are refused (0xA702)")
    spool_threshold_bytes: int = Field(
        default=8 << 20, ge=0, description="data sets beyond this are received to the storage disk as they arrive"
    )
    acse_timeout: float = Field(default=30, gt=0, description="as requestor (sending outputs)")
    artim_timeout: float = Field(
        default=10, gt=0, description="receiver: seconds for a connection to handshake TLS and send its A-ASSOCIATE-RQ"
    )
    dimse_timeout: float = Field(default=60, gt=0)
    network_timeout: float = Field(default=60, gt=0)
    heartbeat_seconds: float = Field(
        default=10, gt=0, description="receiver: how often it writes its liveness into the receivers table"
    )
    receiver_timeout_seconds: float = Field(
        default=60,
        gt=0,
        description="a receiver whose heartbeat is older than this is gone: the reaper closes its open associations",
    )
    accept_unknown_peers: bool = True
    require_called_ae_title: bool = Field(
        default=True, description="reject (A-ASSOCIATE-RJ 1/1/7) requests whose called AE title is not ae_title"
    )
    peers: dict[str, Peer] = Field(default_factory=dict)
    extra_storage_sop_classes: tuple[str, ...] = ()
    tls: TlsSettings = TlsSettings()

    _ae = field_validator("ae_title")(_check_ae_title)

    @model_validator(mode="after")
    def _timeout_spans_heartbeats(self) -> DicomSettings:
        """A live receiver must never look dead: the time-out has to cover at least two missed heartbeats."""
        if self.receiver_timeout_seconds < 2 * self.heartbeat_seconds:
            raise ValueError(
                f"receiver_timeout_seconds ({self.receiver_timeout_seconds:g}) must be at least twice "
                f"heartbeat_seconds ({self.heartbeat_seconds:g})"
            )
        return self

    def peer_for_ae(self, ae_title: str) -> tuple[str, Peer] | None:
        for name, peer in self.peers.items():
            if peer.ae_title == ae_title.strip():
                return name, peer
        return None


class StorageSettings(_Section):
    directory: Path | None = None
    min_free_bytes: int = Field(default=1 << 30, ge=0)
    retention_days: float | None = Field(default=None, gt=0)


class DatabaseSettings(_Section):
    url: str | None = None
    busy_timeout_ms: int = Field(default=30_000, ge=0)


class SeriesSettings(_Section):
    quiet_seconds: float = Field(default=5.0, ge=0)
    sweep_interval_seconds: float = Field(default=1.0, gt=0)


class WorkerSettings(_Section):
    count: int = Field(default=1, ge=0)
    torch_threads: int | None = Field(default=None, ge=1)
    lease_seconds: float = Field(default=120.0, gt=0)
    heartbeat_seconds: float = Field(default=10.0, gt=0)
    poll_seconds: float = Field(default=0.5, gt=0)
    max_attempts: int = Field(default=5, ge=1)
    export_count: int = Field(default=1, ge=0, description="export-only worker threads (0: the workers export too)")
    export_max_attempts: int = Field(default=10, ge=1)
    backoff_base_seconds: float = Field(default=5.0, gt=0)
    backoff_max_seconds: float = Field(default=3600.0, gt=0)
    hold_file: Path | None = Field(
        default=None,
        description="testing only: each claimed job waits (lease kept alive) until this file exists, so a test "
        "can signal or kill a worker mid-job deterministically; never set it in production",
    )


class ModelSettings(_Section):
    directory: Path = DEFAULT_MODEL_DIR
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    backend: Literal["auto", "torch", "onnxruntime", "openvino"] = Field(
        default="auto", description="forward passes: auto = OpenVINO on the CPU if installed (accel extra), else torch"
    )
    cache_dir: Path | None = Field(default=None, description="ONNX exports of the model; default <data_dir>/cache")
    cam_top_k: int = Field(default=3, ge=0, le=32)


class DicomwebDestination(_Section):
    """A DICOMweb origin server outputs go to by STOW-RS (PS3.18 10.5), instead of C-STORE to a peer."""

    url: str = Field(pattern=r"^https?://", description="service root, e.g. https://pacs.example/dicom-web")
    auth: Literal["none", "basic", "bearer"] = "none"
    username: str | None = None
    password: SecretStr | None = Field(default=None, description="basic auth; never logged")
    token: SecretStr | None = Field(default=None, description="bearer auth; never logged")
    verify_tls: bool = Field(default=True, description="verify the server certificate (https)")
    ca_file: Path | None = Field(default=None, description="CA that signed the server's certificate (default: system)")
    cert_file: Path | None = Field(default=None, description="our client certificate, when the server requires one")
    key_file: Path | None = None
    timeout_seconds: float = Field(default=30.0, gt=0, description="connect and read timeout of one request")

    @model_validator(mode="after")
    def _credentials(self) -> DicomwebDestination:
        if self.auth == "basic" and (self.username is None or self.password is None):
            raise ValueError("auth = 'basic' needs username and password")
        if self.auth == "bearer" and self.token is None:
            raise ValueError("auth = 'bearer' needs token")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


class Hl7Destination(_Section):
    """An HL7 v2 receiver (RIS, worklist) that gets one ORU^R01 per assessed series over MLLP."""

    host: str = "127.0.0.1"
    port: int = Field(ge=1, le=65535)
    sending_application: str = "TRIAGED"
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    mode: Literal["urgent", "all"] = Field(default="all", description="which assessed series are notified")
    include_patient_name: bool = Field(default=False, description="PID-5; off: the RIS matches on ID and accession")
    timeout_seconds: float = Field(default=10.0, gt=0, description="connect, and wait for the ACK")


class OutputSettings(_Section):
    mode: Literal["urgent", "all", "none"] = "all"
    destination: str | None = Field(
        default=None, description="a peer or outputs.dicomweb name; default: the peer that sent the study"
    )
    dicomweb: dict[str, DicomwebDestination] = Field(default_factory=dict, description="STOW-RS destinations")
    secondary_captures: bool = True
    key_object_selection: bool = True
    structured_report: bool = True
    not_assessable: Literal["none", "sc", "sr"] = "none"
    series_number: int = Field(default=9900, ge=1, le=99999)
    max_age_hours: float = Field(default=72.0, gt=0, description="an export not delivered by then is dead")
    probe_base_seconds: float = Field(default=5.0, gt=0, description="first C-ECHO probe of a down destination")
    probe_max_seconds: float = Field(default=300.0, gt=0, description="probe backoff ceiling")
    probe_timeout_seconds: float = Field(default=10.0, gt=0, description="connect/ACSE/DIMSE timeout of a probe")


class HttpSettings(_Section):
    enabled: bool = True
    bind_address: str = "127.0.0.1"
    port: int = Field(default=9110, ge=0, le=65535)
    tls_cert_file: Path | None = Field(default=None, description="PEM certificate: serve HTTPS (cookies Secure)")
    tls_key_file: Path | None = Field(default=None, description="PEM private key of tls_cert_file")
    secure_cookies: bool = Field(default=False, description="Secure cookies without tls_* (TLS at a proxy)")
    public_metrics: bool = Field(
        default=False, description="/metrics without login (a scraper that cannot send an API token)"
    )
    show_patient_identifiers: bool = Field(default=False, description="show PatientName/PatientID in the console")
    session_hours: float = Field(default=12.0, gt=0, le=24 * 30, description="console login lifetime")
    login_attempts: int = Field(default=5, ge=1, description="failed logins per client per login_window_seconds")
    login_window_seconds: float = Field(default=300.0, gt=0)


class Settings(BaseSettings):
    """Everything triaged can be told; defaults make ``triaged serve`` work with no file."""

    model_config = SettingsConfigDict(
        env_prefix="TRIAGED_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    data_dir: Path = Field(default_factory=_default_data_dir)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"
    dicom: DicomSettings = DicomSettings()
    storage: StorageSettings = StorageSettings()
    database: DatabaseSettings = DatabaseSettings()
    series: SeriesSettings = SeriesSettings()
    worker: WorkerSettings = WorkerSettings()
    model: ModelSettings = ModelSettings()
    outputs: OutputSettings = OutputSettings()
    http: HttpSettings = HttpSettings()
    notify: dict[str, Hl7Destination] = Field(default_factory=dict, description="HL7 ORU^R01 receivers")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))

    @model_validator(mode="after")
    def _destination_names_unique(self) -> Settings:
        """One circuit breaker per name (the destinations table), so a name means one destination."""
        seen: dict[str, str] = {}
        tables: dict[str, dict[str, Any]] = {
            "dicom.peers": self.dicom.peers,
            "outputs.dicomweb": self.outputs.dicomweb,
            "notify": self.notify,
        }
        for table, names in tables.items():
            for name in names:
                if name in seen:
                    raise ValueError(f"destination name {name!r} is used in both {seen[name]} and {table}")
                seen[name] = table
        return self

    @property
    def storage_dir(self) -> Path:
        return self.storage.directory or self.data_dir / "storage"

    @property
    def model_cache_dir(self) -> Path:
        return self.model.cache_dir or self.data_dir / "cache"

    @property
    def database_url(self) -> str:
        return self.database.url or f"sqlite:///{self.data_dir / 'triaged.db'}"


def _format_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or "(root)"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"config error: {key}: {first['msg']}{more}"


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Load and validate settings; raise :class:`ConfigError` with a one-line message naming the key.

    ``config_file`` defaults to ``$TRIAGED_CONFIG`` when set. Environment variables win over the file;
    ``overrides`` (from CLI options) win over both.
    """
    if config_file is None and os.environ.get(CONFIG_ENV_VAR):
        config_file = Path(os.environ[CONFIG_ENV_VAR])
    settings_cls: type[Settings] = Settings
    if config_file is not None:
        if not config_file.is_file():
            raise ConfigError(f"config error: file not found: {config_file}")
        try:
            tomllib.loads(config_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config error: {config_file}: {exc}") from exc

        class _FileSettings(Settings):
            model_config = SettingsConfigDict(**{**Settings.model_config, "toml_file": config_file})

        settings_cls = _FileSettings
    try:
        return settings_cls(**overrides)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc)) from exc
