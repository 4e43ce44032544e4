"""A fake PACS for tests: a real pynetdicom storage SCP that keeps what it receives (style P12)."""

from __future__ import annotations

import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    KeyObjectSelectionDocumentStorage,
    SecondaryCaptureImageStorage,
)
from pynetdicom import AE, evt

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
VERIFICATION = "1.2.840.10008.1.1"
STORED_STATUSES = (0x0000, 0xB000, 0xB006, 0xB007)


@dataclass
class FakePacs:
    """Answers a scripted status per instance (then 0x0000) and records stored datasets and contexts."""

    port: int
    ae_title: str = "FAKEPACS"
    statuses: list[int] = field(default_factory=list)
    received: list[Dataset] = field(default_factory=list)
    contexts: list[tuple[str, str]] = field(default_factory=list)
    calling_ae_titles: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def handle_store(self, event: evt.Event) -> int:
        with self.lock:
            status = self.statuses.pop(0) if self.statuses else 0x0000
            if status in STORED_STATUSES:
                ds = event.dataset
                ds.file_meta = event.file_meta
                self.received.append(ds)
            self.contexts.append((str(event.context.abstract_syntax), str(event.context.transfer_syntax)))
            self.calling_ae_titles.append(str(event.assoc.requestor.ae_title))
        return status

    def sop_instance_uids(self) -> list[str]:
        with self.lock:
            return [str(ds.SOPInstanceUID) for ds in self.received]


@contextmanager
def running_fake_pacs(ae_title: str = "FAKEPACS", *, ssl_context: ssl.SSLContext | None = None) -> Iterator[FakePacs]:
    """The fake PACS on loopback; ``ssl_context`` makes it a TLS peer (PS3.15 B.1)."""
    fake = FakePacs(port=0, ae_title=ae_title)
    ae = AE(ae_title=ae_title)
    for sop_class in (SecondaryCaptureImageStorage, KeyObjectSelectionDocumentStorage, COMPREHENSIVE_3D_SR):
        ae.add_supported_context(sop_class, [ExplicitVRLittleEndian])
    ae.add_supported_context(VERIFICATION, [ImplicitVRLittleEndian])  # answers the C-ECHO probes
    # port 0: the server binds a free port itself (no time-of-check/time-of-use gap), then we read it back
    server = ae.start_server(
        ("127.0.0.1", 0),
        block=False,
        evt_handlers=[(evt.EVT_C_STORE, fake.handle_store)],
        ssl_context=ssl_context,
    )
    assert server is not None
    fake.port = int(server.server_address[1])
    try:
        yield fake
    finally:
        server.shutdown()
