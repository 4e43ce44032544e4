"""TLS: associations over TLS work, and every refusal says why (issue 12 item 6, issue 11 on lines 51-67).

Each refusal is checked from both ends: the client's own TLS error (a real ``ssl`` handshake against the
real receiver) or pynetdicom's failure, and the receiver's ``tls_handshake_failed`` event with its reason,
which is never ``timeout`` for these (so a refusal cannot pass as a hang). Refused handshakes leave no
association row. A client that stalls in the handshake holds no association slot and does not stop the
accept loop.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from structlog.testing import capture_logs

from tests.support.certs import Certs, make_certs
from tests.support.connections import closed_by_peer, connect_from
from tests.support.receiver import (
    instance_rows,
    receiver_settings,
    running_receiver,
    send,
    synthetic_series,
    wait_for,
)
from triaged.db.models import Association
from triaged.errors import DicomPeerError
from triaged.outputs.send import echo
from triaged.receive.scp import Receiver
from triaged.receive.tls import client_ssl_context


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def _tls(
    certs: Certs, *, require_client_cert: bool, cert: Path | None = None, key: Path | None = None
) -> dict[str, Any]:
    return {
        "enabled": True,
        "cert_file": str(cert or certs.server_cert),
        "key_file": str(key or certs.server_key),
        "ca_file": str(certs.ca),
        "require_client_cert": require_client_cert,
    }


def _rows(session_factory: sessionmaker[Session]) -> list[Association]:
    with session_factory() as session:
        return list(session.scalars(select(Association)))


def _handshake_failures(logs: list[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """Wait until the receiver has logged ``count`` failed handshakes; return them."""
    wait_for(lambda: sum(e["event"] == "tls_handshake_failed" for e in logs) >= count, timeout=60)
    failures = [e for e in logs if e["event"] == "tls_handshake_failed"]
    assert len(failures) == count, failures
    return failures


@contextmanager
def _client(port: int, context: ssl.SSLContext, server_hostname: str | None = None) -> Iterator[ssl.SSLSocket]:
    """A client-side TLS handshake with the receiver (raises what ``ssl`` raises)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=60)
    try:
        with context.wrap_socket(raw, server_hostname=server_hostname) as tls:
            yield tls
    finally:
        raw.close()


def _server_rejects_client(port: int, context: ssl.SSLContext) -> None:
    """TLS 1.3 finishes the client's side before the server checks the client certificate: the refusal
    arrives as an alert on the first read (or as the connection closing)."""
    with _client(port, context) as tls:
        try:
            data = tls.recv(1)
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
            return
        assert data == b"", "the receiver answered a client it should have refused"


def test_tls_association_stores_and_plain_tcp_is_refused_for_its_protocol(
    tmp_path, certs, make_settings, session_factory
):
    settings = receiver_settings(make_settings, dicom={"tls": _tls(certs, require_client_cert=False)})
    paths = synthetic_series(tmp_path / "src", 2)
    with running_receiver(settings, session_factory) as receiver, capture_logs() as logs:
        context = client_ssl_context(ca_file=certs.ca)
        assert (
            echo("127.0.0.1", receiver.port, called_ae_title="TRIAGED", calling_ae_title="TLSSCU", ssl_context=context)
            == 0
        )
        assert [r.status for r in send(receiver, paths, ssl_context=client_ssl_context(ca_file=certs.ca))] == [0, 0]
        rows_before = len(_rows(session_factory))
        with pytest.raises(DicomPeerError, match=r"aborted|could not associate"):  # plain TCP to a TLS port
            echo("127.0.0.1", receiver.port, called_ae_title="TRIAGED", calling_ae_title="PLAIN", timeout=60)
        (failure,) = _handshake_failures(logs, 1)
        # A DICOM A-ASSOCIATE-RQ is not a TLS record: refused for what it is, not after a timeout.
        assert failure["reason"] == "WRONG_VERSION_NUMBER", failure
        assert len(_rows(session_factory)) == rows_before
    assert len(instance_rows(session_factory)) == 2


def test_untrusted_server_certificate_is_refused_by_the_client(certs, make_settings, session_factory, caplog):
    settings = receiver_settings(make_settings, dicom={"tls": _tls(certs, require_client_cert=False)})
    with running_receiver(settings, session_factory) as receiver, capture_logs() as logs:
        # The client trusts only the rogue CA, which did not sign the receiver's certificate.
        distrusting = client_ssl_context(ca_file=certs.rogue_ca)
        with pytest.raises(ssl.SSLCertVerificationError) as refused, _client(receiver.port, distrusting):
            pass
        # X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN: the receiver sends its chain up to its own CA (OpenSSL builds
        # it from ca_file), a root this client does not trust.
        assert refused.value.verify_code == 19, refused.value
        (failure,) = _handshake_failures(logs, 1)
        assert failure["reason"] == "TLSV1_ALERT_UNKNOWN_CA", failure
        caplog.clear()
        with pytest.raises(DicomPeerError):  # pynetdicom's failure; it logs the client's TLS error
            echo(
                "127.0.0.1",
                receiver.port,
                called_ae_title="TRIAGED",
                calling_ae_title="DISTRUST",
                ssl_context=distrusting,
                timeout=60,
            )
        assert "certificate verify failed: self-signed certificate in certificate chain" in caplog.text
        _handshake_failures(logs, 2)
    assert _rows(session_factory) == []


def test_expired_server_certificate_is_refused_by_the_client(certs, make_settings, session_factory):
    tls = _tls(certs, require_client_cert=False, cert=certs.expired_server_cert, key=certs.expired_server_key)
    settings = receiver_settings(make_settings, dicom={"tls": tls})
    with running_receiver(settings, session_factory) as receiver, capture_logs() as logs:
        with (
            pytest.raises(ssl.SSLCertVerificationError) as refused,
            _client(receiver.port, client_ssl_context(ca_file=certs.ca)),
        ):
            pass
        assert refused.value.verify_code == 10  # X509_V_ERR_CERT_HAS_EXPIRED
        (failure,) = _handshake_failures(logs, 1)
        assert failure["reason"] == "SSLV3_ALERT_CERTIFICATE_EXPIRED", failure
    assert _rows(session_factory) == []


def test_server_certificate_for_another_name_is_refused_when_the_client_checks_names(
    certs, make_settings, session_factory
):
    tls = _tls(certs, require_client_cert=False, cert=certs.wrong_name_server_cert, key=certs.wrong_name_server_key)
    settings = receiver_settings(make_settings, dicom={"tls": tls})
    with running_receiver(settings, session_factory) as receiver, capture_logs() as logs:
        checking = client_ssl_context(ca_file=certs.ca, server_hostname_check=True)
        with pytest.raises(ssl.SSLCertVerificationError) as refused, _client(receiver.port, checking, "localhost"):
            pass
        assert refused.value.verify_code == 62  # X509_V_ERR_HOSTNAME_MISMATCH
        (failure,) = _handshake_failures(logs, 1)
        assert failure["reason"] == "SSLV3_ALERT_BAD_CERTIFICATE", failure
        # Without the name check (triaged's default for IP-addressed peers) the same certificate is accepted.
        plain = client_ssl_context(ca_file=certs.ca)
        assert (
            echo("127.0.0.1", receiver.port, called_ae_title="TRIAGED", calling_ae_title="NONAME", ssl_context=plain)
            == 0
        )
    assert [r.calling_ae_title for r in _rows(session_factory)] == ["NONAME"]


def test_client_certificates_required(tmp_path, certs, make_settings, session_factory):
    settings = receiver_settings(make_settings, dicom={"tls": _tls(certs, require_client_cert=True)})
    paths = synthetic_series(tmp_path / "src", 1)
    with running_receiver(settings, session_factory) as receiver, capture_logs() as logs:
        trusted = client_ssl_context(ca_file=certs.ca, cert_file=certs.client_cert, key_file=certs.client_key)
        assert [r.status for r in send(receiver, paths, ssl_context=trusted, calling_ae="TRUSTED")] == [0]

        # A client certificate from another CA.
        rogue = client_ssl_context(ca_file=certs.ca, cert_file=certs.rogue_cert, key_file=certs.rogue_key)
        _server_rejects_client(receiver.port, rogue)
        (other_ca,) = _handshake_failures(logs, 1)
        assert other_ca["reason"] == "CERTIFICATE_VERIFY_FAILED", other_ca
        assert "unable to get local issuer certificate" in other_ca["error"]

        # No client certificate at all.
        _server_rejects_client(receiver.port, client_ssl_context(ca_file=certs.ca))
        none = _handshake_failures(logs, 2)[1]
        assert none["reason"] == "PEER_DID_NOT_RETURN_A_CERTIFICATE", none

        # Through pynetdicom as a sender would: refused, and the receiver logs why.
        with pytest.raises(DicomPeerError):
            echo(
                "127.0.0.1",
                receiver.port,
                called_ae_title="TRIAGED",
                calling_ae_title="ROGUE",
                ssl_context=rogue,
                timeout=60,
            )
        assert _handshake_failures(logs, 3)[2]["reason"] == "CERTIFICATE_VERIFY_FAILED"

        # The listener survives refused handshakes.
        assert (
            echo("127.0.0.1", receiver.port, called_ae_title="TRIAGED", calling_ae_title="AGAIN", ssl_context=trusted)
            == 0
        )
    assert sorted(r.calling_ae_title for r in _rows(session_factory)) == ["AGAIN", "TRUSTED"]
    assert len(instance_rows(session_factory)) == 1


def _stall(receiver: Receiver, source: str) -> socket.socket:
    """A client that starts a TLS handshake (the 5-byte header of a ClientHello record) and stops there."""
    sock = connect_from(source, receiver.port)
    sock.sendall(bytes([0x16, 0x03, 0x01, 0x02, 0x00]))  # handshake record, TLS 1.0 framing, 512 bytes to come
    wait_for(lambda: receiver.admission.connections_from(source) == 1)
    return sock


def test_a_stalled_handshake_holds_no_association_slot_and_does_not_stop_accepting(
    certs, make_settings, session_factory
):
    tls = _tls(certs, require_client_cert=False)
    settings = receiver_settings(make_settings, dicom={"tls": tls, "max_associations": 1, "artim_timeout": 600})
    with running_receiver(settings, session_factory) as receiver:
        stalled = [_stall(receiver, "127.0.0.2"), _stall(receiver, "127.0.0.3")]
        try:
            assert receiver.admission.associations_in_use() == 0
            # The one association slot is free, and the accept loop is not waiting on the stalled clients.
            context = client_ssl_context(ca_file=certs.ca)
            status = echo(
                "127.0.0.1", receiver.port, called_ae_title="TRIAGED", calling_ae_title="LEGIT", ssl_context=context
            )
            assert status == 0
            assert not any(closed_by_peer(s) for s in stalled)  # still stalled, still open
        finally:
            for sock in stalled:
                sock.close()


def test_a_stalled_handshake_is_closed_after_artim(certs, make_settings, session_factory):
    settings = receiver_settings(
        make_settings, dicom={"tls": _tls(certs, require_client_cert=False), "artim_timeout": 0.5}
    )
    with running_receiver(settings, session_factory) as receiver, capture_logs() as logs:
        sock = _stall(receiver, "127.0.0.2")
        try:
            wait_for(lambda: closed_by_peer(sock), timeout=60)
        finally:
            sock.close()
        (failure,) = _handshake_failures(logs, 1)
        assert failure["reason"] == "timeout" and failure["peer"].startswith("127.0.0.2:")
        wait_for(lambda: receiver.admission.connections_from("127.0.0.2") == 0)
    assert _rows(session_factory) == []


def test_a_trickling_handshake_is_closed_after_artim_in_all(certs, make_settings, session_factory):
    """One byte of the ClientHello record every 0.1 s (512 to come, about 51 s): ARTIM (0.5 s) bounds the
    whole handshake, not each read, so the receiver closes long before the record is complete."""
    settings = receiver_settings(
        make_settings, dicom={"tls": _tls(certs, require_client_cert=False), "artim_timeout": 0.5}
    )
    with running_receiver(settings, session_factory) as receiver, capture_logs() as logs:
        sock = _stall(receiver, "127.0.0.2")
        sent = 0
        try:
            while sent < 512 and not closed_by_peer(sock):
                try:
                    sock.sendall(b"\x00")
                except OSError:  # reset by the receiver
                    break
                sent += 1
                time.sleep(0.1)  # the trickle's pace, not a wait for the receiver
        finally:
            sock.close()
        assert sent < 512, "the receiver waited for the whole trickled record"
        (failure,) = _handshake_failures(logs, 1)
        assert failure["reason"] == "timeout", failure
