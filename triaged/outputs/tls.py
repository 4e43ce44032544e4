"""TLS for the associations triaged opens to a destination (PS3.15 B.1, the Basic TLS Secure Transport profile).

Inbound TLS (`dicom.tls`) protects what a PACS sends us; this protects what we send back: the outputs carry the
same patient and study attributes. The destination's certificate is verified against its CA file (or the
system store); a client certificate is presented when the peer requires one.
"""

from __future__ import annotations

import ssl

from triaged.config import PeerTls
from triaged.errors import ConfigError


def destination_ssl_context(tls: PeerTls, name: str) -> ssl.SSLContext | None:
    """The client context for destination ``name``, or None when its TLS is off.

    Raises :class:`ConfigError` (one line naming the peer) when a certificate or key cannot be loaded.
    """
    if not tls.enabled:
        return None
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_file) if tls.ca_file else None)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.check_hostname = tls.check_hostname
        if tls.cert_file is not None:
            context.load_cert_chain(certfile=str(tls.cert_file), keyfile=str(tls.key_file) if tls.key_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"config error: dicom.peers.{name}.tls: cannot load certificates: {exc}") from exc
    return context
