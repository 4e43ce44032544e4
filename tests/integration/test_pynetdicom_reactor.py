"""Event-driven pynetdicom loops: associations still work, and an idle one costs (almost) no CPU."""

from __future__ import annotations

import time

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.association import Association

from tests.support.receiver import wait_for
from triaged.dicom.contexts import VERIFICATION_SOP_CLASS, pynetdicom_config
from triaged.receive import reactor


def _thread_cpu_seconds(idents: list[int]) -> float:
    """CPU time of just these threads of this process (each thread's CPU-time clock, nanosecond resolution).

    Not ``RUSAGE_SELF``: that counts every thread of the pytest process, including ones earlier tests left.
    """
    return sum(time.clock_gettime(time.pthread_getcpuclockid(ident)) for ident in idents)


def _association_threads(associations: list[Association]) -> list[int]:
    """Thread idents of the association and DUL threads of these associations (both ends, if given)."""
    ids = []
    for assoc in associations:
        for thread in (assoc, assoc.dul):
            assert thread.ident is not None and thread.is_alive()
            ids.append(thread.ident)
    return ids


def test_install_is_idempotent_and_only_for_the_copied_release():
    with pynetdicom_config():
        assert reactor.install() is True
        assert reactor.install() is True
    assert reactor.is_installed()
    assert reactor.is_supported("3.0.4")
    assert not reactor.is_supported("3.1.0")
    assert not reactor.is_supported("2.0.2")


def test_many_requests_on_one_association_and_idle_associations_stay_cheap():
    """50 C-ECHOs on one association each get their answer; 6 idle associations then use < 0.1 s CPU per s.

    With pynetdicom's stock loops each idle association wakes 2000 times a second (two 1 ms polls);
    measured here: 6 idle associations (both ends) used 0.22 s CPU per second polling, 0.02 s event-driven.
    Only the associations' own threads are measured, so other threads of the test process do not count.
    The check fails with the stock loops (``reactor.install`` not called) on an idle machine as on a busy
    one: a polling thread's CPU per wake-up does not shrink when the machine is loaded.
    """
    with pynetdicom_config():
        scp = AE("REACTOR")
        scp.add_supported_context(VERIFICATION_SOP_CLASS)
        seen: list[int] = []

        def on_echo(event: evt.Event) -> int:
            seen.append(int(event.request.MessageID or 0))
            return 0x0000

        server = scp.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_ECHO, on_echo)])
        scu = AE("USER")
        scu.add_requested_context(VERIFICATION_SOP_CLASS)
        port = int(server.server_address[1])
        associations = []
        try:
            first = scu.associate("127.0.0.1", port, ae_title="REACTOR")
            assert first.is_established
            associations.append(first)
            statuses: list[Dataset] = [first.send_c_echo(msg_id=i) for i in range(1, 51)]
            assert [int(s.Status) for s in statuses] == [0] * 50
            assert seen == list(range(1, 51))
            for _ in range(5):
                assoc = scu.associate("127.0.0.1", port, ae_title="REACTOR")
                assert assoc.is_established
                associations.append(assoc)
            wait_for(lambda: sum(a.is_established for a in server.active_associations) == 6)
            acceptors = [a for a in server.active_associations if a.is_established]
            threads = _association_threads(associations + acceptors)  # 24 threads: 6 x 2 ends x 2 loops
            before = _thread_cpu_seconds(threads)
            time.sleep(1.0)  # a sample of idle time, not a wait for anything
            idle_cpu = _thread_cpu_seconds(threads) - before
            assert idle_cpu < 0.1, f"6 idle associations (both ends, 24 threads) used {idle_cpu:.3f} s CPU in 1 s"
        finally:
            for assoc in associations:
                assoc.release()
            server.shutdown()
        assert all(a.is_released for a in associations)
