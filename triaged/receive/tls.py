"""TLS contexts for DICOM associations (PS3.15 Annex B.1, TLS secure transport connection profile)."""

from __future__ import annotations

import ssl
from pathlib import Path

from triaged.config import TlsSettings
from triaged.errors import ConfigError


def server_ssl_context(tls: TlsSettings) -> ssl.SSLContext | None:
    """Server context from settings, or None when TLS is off; client certificates required if configured."""
    if not tls.enabled:
        return None
    if tls.cert_file is None or tls.key_file is None:
        raise ConfigError("config error: dicom.tls: cert_file and key_file are required when TLS is enabled")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile=str(tls.cert_file), keyfile=str(tls.key_file))
        if tls.ca_file is not None:
            context.load_verify_locations(cafile=str(tls.ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"config error: dicom.tls: cannot load certificates: {exc}") from exc
    context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_NONE
    return context


def client_ssl_context(
    *,
    ca_file: Path | None = None,
    cert_file: Path | None = None,
    key_file: Path | None = None,
    server_hostname_check: bool = False,
) -> ssl.SSLContext:
    """Client context: verify the server against ``ca_file`` (or the system store); optional client cert.

    Hostname checking is off by default: DICOM peers are addressed by IP and AE title, and the server
    certificate is pinned through the CA file.
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file) if ca_file else None)
    context.check_hostname = server_hostname_check
    if cert_file is not None:
        try:
            context.load_cert_chain(certfile=str(cert_file), keyfile=str(key_file) if key_file else None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load client certificate: {exc}") from exc
    return context
