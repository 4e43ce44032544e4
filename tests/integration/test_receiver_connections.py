"""Connections that never associate cannot keep real senders out (issue 12 item 1), with real sockets.

Idle TCP connections come from 127.0.0.2 and up (see tests/support/connections.py), the legitimate
sender from 127.0.0.1. Every wait is for a state the receiver reports (its admission counts, a socket
it closed, a log event), never for a time.
"""

from __future__ import annotations

from structlog.testing import capture_logs

from tests.support.connections import (
    associate,
    close,
    closed_by_peer,
    connect_from,
    idle_connections,
    real_request,
    rejection,
)
from tests.support.receiver import (
    dcmtk,
    instance_rows,
    receiver_settings,
    run_dcmtk,
    running_receiver,
    send,
    synthetic_series,
    wait_for,
)
from triaged.outputs.send import echo
from triaged.receive.scp import Receiver

IDLE_SOURCES = [f"127.0.0.{n}" for n in range(2, 12)]  # 10 addresses x 10 connections = 100


def _open_connections(receiver: Receiver, sources: list[str]) -> int:
    return sum(receiver.admission.connections_from(s) for s in sources)


def test_100_idle_connections_do_not_stop_a_real_sender(tmp_path, make_settings, session_factory):
    """The attack from issue 12: 100 silent connections held open; C-ECHO and C-STORE still succeed.

    ``max_associations = 2`` (far below 100) shows the idle connections hold no association slot at all;
    a long ARTIM keeps them open for the whole test, which the last check proves.
    """
    settings = receiver_settings(make_settings, dicom={"max_associations": 2, "artim_timeout": 600})
    paths = synthetic_series(tmp_path / "src", 3)
    with (
        running_receiver(settings, session_factory) as receiver,
        idle_connections(receiver.port, IDLE_SOURCES, 10) as idle,
    ):
        wait_for(lambda: _open_connections(receiver, IDLE_SOURCES) == 100, timeout=120)
        assert receiver.admission.associations_in_use() == 0

        assert echo("127.0.0.1", receiver.port, called_ae_title="TRIAGED", calling_ae_title="LEGIT") == 0
        assert [r.status for r in send(receiver, paths, calling_ae="LEGIT")] == [0, 0, 0]
        proc = run_dcmtk([dcmtk("echoscu"), "-aet", "DCMTK", "-aec", "TRIAGED", "127.0.0.1", str(receiver.port)])
        assert proc.returncode == 0, proc.stderr
        # Both association slots at once, next to the 100 idle connections.
        held = [associate(receiver.port, calling_ae=f"HOLD{i}") for i in range(2)]
        try:
            assert all(assoc.is_established for _, assoc in held)
            assert receiver.admission.associations_in_use() == 2
        finally:
            for ae, assoc in held:
                close(ae, assoc)

        assert not any(closed_by_peer(sock) for sock in idle), "the idle connections were not held open throughout"
        assert _open_connections(receiver, IDLE_SOURCES) == 100
    wait_for(lambda: _open_connections(receiver, IDLE_SOURCES) == 0, timeout=60)
    assert len(instance_rows(session_factory)) == 3


def test_one_address_may_open_only_max_connections_per_address(make_settings, session_factory):
    settings = receiver_settings(make_settings, dicom={"max_connections_per_address": 8, "artim_timeout": 600})
    with running_receiver(settings, session_factory) as receiver, capture_logs() as logs:
        with idle_connections(receiver.port, ["127.0.0.2"], 20) as idle:
            # The kernel queues all 20; the receiver admits 8 and closes the other 12 at once.
            wait_for(lambda: sum(closed_by_peer(s) for s in idle) == 12, timeout=60)
            wait_for(lambda: receiver.admission.connections_from("127.0.0.2") == 8)
            refused = [e for e in logs if e["event"] == "connection_refused"]
            assert len(refused) == 12
            assert {e["reason"] for e in refused} == {"too_many_connections_from_address"}
            assert all(e["peer"].startswith("127.0.0.2:") and e["limit"] == 8 for e in refused)

            # That address cannot associate either while it holds 8; other addresses are not affected.
            ae, assoc = associate(receiver.port, calling_ae="SAMEADDR", source="127.0.0.2")
            assert not assoc.is_established
            close(ae, assoc)
            assert echo("127.0.0.1", receiver.port, called_ae_title="TRIAGED", calling_ae_title="OTHER") == 0
        wait_for(lambda: receiver.admission.connections_from("127.0.0.2") == 0, timeout=60)
        ae, assoc = associate(receiver.port, calling_ae="SAMEADDR", source="127.0.0.2")
        try:
            assert assoc.is_established
        finally:
            close(ae, assoc)


def test_a_silent_connection_is_closed_by_the_artim_timer(make_settings, session_factory):
    settings = receiver_settings(make_settings, dicom={"artim_timeout": 0.5})
    with running_receiver(settings, session_factory) as receiver, capture_logs() as logs:
        sock = connect_from("127.0.0.2", receiver.port)
        try:
            wait_for(lambda: closed_by_peer(sock), timeout=60)
        finally:
            sock.close()
        wait_for(lambda: receiver.admission.connections_from("127.0.0.2") == 0)
        wait_for(lambda: any(e["event"] == "connection_closed_before_association" for e in logs))
        (closed,) = [e for e in logs if e["event"] == "connection_closed_before_association"]
        assert closed["peer"].startswith("127.0.0.2:")
        # Not closed before the timer ran: a silent connection gets its full ARTIM.
        assert closed["seconds"] >= 0.5
        assert receiver.admission.associations_in_use() == 0


def test_association_limit_is_a_transient_reject_logged_apart_from_an_unknown_calling_ae(
    make_settings, session_factory
):
    """A-ASSOCIATE-RJ at the limit: result 2 (transient), source 3 (provider, presentation), reason 2
    (local limit exceeded); an unknown calling AE: result 1 (permanent), source 1 (user), reason 3."""
    settings = receiver_settings(
        make_settings,
        dicom={
            "max_associations": 1,
            "accept_unknown_peers": False,
            "peers": {"a": {"ae_title": "HOLDER", "port": 104}, "b": {"ae_title": "SECOND", "port": 104}},
        },
    )
    with running_receiver(settings, session_factory) as receiver, capture_logs() as logs:
        holder_ae, holder = associate(receiver.port, calling_ae="HOLDER")
        try:
            assert holder.is_established
            ae, second = associate(receiver.port, calling_ae="SECOND")
            assert rejection(second) == (0x02, 0x03, 0x02)
            close(ae, second)
            ae, stranger = associate(receiver.port, calling_ae="STRANGER")
            assert rejection(stranger) == (0x01, 0x01, 0x03)
            close(ae, stranger)
        finally:
            close(holder_ae, holder)
        wait_for(lambda: receiver.admission.associations_in_use() == 0)
        ae, third = associate(receiver.port, calling_ae="SECOND")
        try:
            assert third.is_established
        finally:
            close(ae, third)
    (limit,) = [e for e in logs if e["event"] == "association_rejected_limit"]
    assert (limit["calling_ae"], limit["limit"], limit["in_use"], limit["transient"]) == ("SECOND", 1, 1, True)
    (unknown,) = [e for e in logs if e["event"] == "association_rejected"]
    assert (unknown["calling_ae"], unknown["reason"], unknown["transient"]) == (
        "STRANGER",
        "calling_ae_not_recognised",
        False,
    )


def test_a_connection_aborted_for_a_malformed_request_is_freed_when_the_peer_closes(make_settings, session_factory):
    """pynetdicom aborts an A-ASSOCIATE-RQ it cannot decode (here: a non-ASCII byte in the called AE title)
    and then waits in Sta13; the peer closing must end it then, not after ARTIM (600 s here)."""
    settings = receiver_settings(make_settings, dicom={"artim_timeout": 600, "max_connections_per_address": 1})
    with running_receiver(settings, session_factory) as receiver:
        request = bytearray(real_request())
        request[10] = 0xFF  # inside the called AE title (bytes 10-25 of the PDU)
        sock = connect_from("127.0.0.6", receiver.port)
        try:
            sock.sendall(bytes(request))
            assert sock.recv(1) == b"\x07"  # A-ABORT
        finally:
            sock.close()
        wait_for(lambda: receiver.admission.connections_from("127.0.0.6") == 0, timeout=60)
        ae, assoc = associate(receiver.port, calling_ae="NEXT", source="127.0.0.6")
        try:
            assert assoc.is_established
        finally:
            close(ae, assoc)
