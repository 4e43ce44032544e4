"""TLS: associations over TLS work; without a trusted client certificate they are refused when required."""

from __future__ import annotations

import pytest

from tests.support.certs import Certs, make_certs
from tests.support.receiver import instance_rows, receiver_settings, running_receiver, send, synthetic_series
from triaged.dicom.send import echo
from triaged.errors import DicomPeerError
from triaged.receive.tls import client_ssl_context


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def _tls(certs: Certs, *, require_client_cert: bool) -> dict[str, object]:
    return {
        "enabled": True,
        "cert_file": str(certs.server_cert),
        "key_file": str(certs.server_key),
        "ca_file": str(certs.ca),
        "require_client_cert": require_client_cert,
    }


def test_tls_association_stores(tmp_path, certs, make_settings, session_factory):
    settings = receiver_settings(make_settings, dicom={"tls": _tls(certs, require_client_cert=False)})
    paths = synthetic_series(tmp_path / "src", 2)
    with running_receiver(settings, session_factory) as receiver:
        context = client_ssl_context(ca_file=certs.ca)
        assert (
            echo("127.0.0.1", receiver.port, called_ae_title="TRIAGED", calling_ae_title="TLSSCU", ssl_context=context)
            == 0
        )
        assert [r.status for r in send(receiver, paths, ssl_context=client_ssl_context(ca_file=certs.ca))] == [0, 0]
        with pytest.raises(DicomPeerError):  # plain TCP to a TLS port
            echo("127.0.0.1", receiver.port, called_ae_title="TRIAGED", calling_ae_title="PLAIN", timeout=5)
    assert len(instance_rows(session_factory)) == 2


def test_client_certificate_required(tmp_path, certs, make_settings, session_factory):
    settings = receiver_settings(make_settings, dicom={"tls": _tls(certs, require_client_cert=True)})
    paths = synthetic_series(tmp_path / "src", 1)
    with running_receiver(settings, session_factory) as receiver:
        trusted = client_ssl_context(ca_file=certs.ca, cert_file=certs.client_cert, key_file=certs.client_key)
        assert [r.status for r in send(receiver, paths, ssl_context=trusted)] == [0]
        rogue = client_ssl_context(ca_file=certs.ca, cert_file=certs.rogue_cert, key_file=certs.rogue_key)
        with pytest.raises(DicomPeerError):
            echo(
                "127.0.0.1",
                receiver.port,
                called_ae_title="TRIAGED",
                calling_ae_title="ROGUE",
                ssl_context=rogue,
                timeout=5,
            )
        with pytest.raises(DicomPeerError):
            echo(
                "127.0.0.1",
                receiver.port,
                called_ae_title="TRIAGED",
                calling_ae_title="NOCERT",
                ssl_context=client_ssl_context(ca_file=certs.ca),
                timeout=5,
            )
        # The listener survives refused handshakes.
        assert (
            echo("127.0.0.1", receiver.port, called_ae_title="TRIAGED", calling_ae_title="AGAIN", ssl_context=trusted)
            == 0
        )
    assert len(instance_rows(session_factory)) == 1
