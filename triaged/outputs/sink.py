"""A minimal storage SCP that keeps what it receives in memory: the demo's stand-in PACS.

It accepts exactly the classes triaged produces (Secondary Capture, KOS, Comprehensive 3D SR) in the
uncompressed transfer syntaxes, so the demo exercises the real sender end to end. Not for production use.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass, field

from pydicom.dataset import Dataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    KeyObjectSelectionDocumentStorage,
    SecondaryCaptureImageStorage,
)
from pynetdicom import AE, evt
from pynetdicom.transport import ThreadedAssociationServer

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SINK_CLASSES = (SecondaryCaptureImageStorage, KeyObjectSelectionDocumentStorage, COMPREHENSIVE_3D_SR)


@dataclass
class StorageSink:
    ae_title: str = "DEMOPACS"
    host: str = "127.0.0.1"
    received: list[Dataset] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadedAssociationServer | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the sink is not running")
        return int(self._server.server_address[1])

    def _on_store(self, event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self._lock:
            self.received.append(ds)
        return 0x0000

    @staticmethod
    def _nodelay(event: evt.Event) -> None:
        sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
        if isinstance(sock, socket.socket):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def start(self) -> None:
        ae = AE(ae_title=self.ae_title)
        for sop_class in SINK_CLASSES:
            ae.add_supported_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self._server = ae.start_server(
            (self.host, 0),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._on_store), (evt.EVT_CONN_OPEN, self._nodelay)],
        )

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def datasets(self) -> list[Dataset]:
        with self._lock:
            return list(self.received)
