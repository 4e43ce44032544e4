"""The output sender against real pynetdicom storage SCPs on loopback: contexts, statuses, failures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, KeyObjectSelectionDocumentStorage, SecondaryCaptureImageStorage
from pynetdicom import AE, evt

from tests.conftest import free_port
from tests.support.fake_pacs import COMPREHENSIVE_3D_SR, FakePacs, running_fake_pacs
from triaged.config import OutputSettings
from triaged.dicom.synthetic import write_mr_series
from triaged.errors import DicomPeerError, DicomSendError
from triaged.outputs.build import build_outputs, encode
from triaged.outputs.dimse import Destination, SendOptions, StoreResult, send_files
from triaged.outputs.summary import KeySlice, TriageSummary


@pytest.fixture
def pacs() -> Iterator[FakePacs]:
    with running_fake_pacs() as fake:
        yield fake


@pytest.fixture
def output_files(tmp_path: Path) -> list[Path]:
    yy, xx = np.mgrid[0:64, 0:64]
    slices = [((xx - 32) ** 2 + (yy - 32) ** 2 < 700) * (500.0 + i) for i in range(3)]
    sources = [pydicom.dcmread(p) for p in write_mr_series(slices, tmp_path / "src", seed="scu")]
    summary = TriageSummary(
        series_instance_uid=str(sources[0].SeriesInstanceUID),
        generation=1,
        status="assessed",
        model_name="m",
        model_version="1",
        model_sha256="a" * 64,
        label="glioma",
        probabilities={"glioma": 0.9, "notumor": 0.1},
        urgency=0.9,
        threshold=0.5,
        urgent=True,
    )
    cam = np.ones((64, 64), dtype=np.float32)
    built = build_outputs(summary, [KeySlice(sources[1], None, cam, 0.9)], sources, OutputSettings())
    paths = []
    for output in built:
        path = tmp_path / f"{output.kind}{output.index}.dcm"
        path.write_bytes(encode(output.dataset))
        paths.append(path)
    return paths


def _destination(port: int) -> Destination:
    return Destination(name="pacs", ae_title="FAKEPACS", host="127.0.0.1", port=port)


def test_sends_every_object_with_its_exact_context(pacs: FakePacs, output_files: list[Path]) -> None:
    stored: list[StoreResult] = []
    results = send_files(
        output_files, _destination(pacs.port), SendOptions(calling_ae_title="TRIAGED"), on_stored=stored.append
    )
    assert [r.status for r in results] == [0, 0, 0]
    assert stored == results
    sent = {str(pydicom.dcmread(p).SOPInstanceUID) for p in output_files}
    assert {str(ds.SOPInstanceUID) for ds in pacs.received} == sent
    assert pacs.contexts == [
        (SecondaryCaptureImageStorage, ExplicitVRLittleEndian),
        (KeyObjectSelectionDocumentStorage, ExplicitVRLittleEndian),
        (COMPREHENSIVE_3D_SR, ExplicitVRLittleEndian),
    ]
    sc = next(ds for ds in pacs.received if ds.SOPClassUID == SecondaryCaptureImageStorage)
    assert sc.BurnedInAnnotation == "YES" and sc.pixel_array.shape[2] == 3


def test_warning_statuses_count_as_stored(pacs: FakePacs, output_files: list[Path]) -> None:
    pacs.statuses = [0xB000, 0xB007, 0xB006]
    results = send_files(output_files, _destination(pacs.port))
    assert [r.status for r in results] == [0xB000, 0xB007, 0xB006]
    assert all(r.warning for r in results)
    assert len(pacs.received) == 3


def test_failure_status_stops_and_reports_progress(pacs: FakePacs, output_files: list[Path]) -> None:
    pacs.statuses = [0x0000, 0xA700]
    stored: list[StoreResult] = []
    with pytest.raises(DicomSendError, match="0xA700") as info:
        send_files(output_files, _destination(pacs.port), on_stored=stored.append)
    assert info.value.status == 0xA700 and info.value.retryable
    assert [r.path for r in stored] == output_files[:1]


# pynetdicom 3.0 shuts down (and so never closes) the socket of a refused connection; the GC closes it.
@pytest.mark.filterwarnings("ignore:Exception ignored in. <socket.socket:pytest.PytestUnraisableExceptionWarning")
def test_unreachable_peer_is_a_retryable_peer_error(output_files: list[Path]) -> None:
    options = SendOptions(acse_timeout=5, network_timeout=5)
    with pytest.raises(DicomPeerError, match="could not be reached") as info:
        send_files(output_files, _destination(free_port()), options)
    assert info.value.retryable


def test_wrong_called_ae_title_is_rejected(output_files: list[Path]) -> None:
    port = free_port()
    ae = AE(ae_title="STRICT")
    ae.require_called_aet = True
    ae.add_supported_context(SecondaryCaptureImageStorage, [ExplicitVRLittleEndian])
    server = ae.start_server(("127.0.0.1", port), block=False)
    assert server is not None
    try:
        with pytest.raises(DicomPeerError, match="rejected"):
            send_files(output_files, Destination("strict", "OTHER", "127.0.0.1", port))
    finally:
        server.shutdown()


def test_unsupported_sop_class_is_a_clear_send_error(output_files: list[Path]) -> None:
    port = free_port()
    ae = AE(ae_title="SCONLY")
    ae.add_supported_context(SecondaryCaptureImageStorage, [ExplicitVRLittleEndian])
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda event: 0)])
    assert server is not None
    try:
        with pytest.raises(DicomSendError, match="did not accept"):
            send_files(output_files, Destination("sconly", "SCONLY", "127.0.0.1", port))
    finally:
        server.shutdown()


def test_empty_batch_opens_no_association() -> None:
    assert send_files([], _destination(free_port())) == []


def test_requestor_socket_has_tcp_nodelay(pacs: FakePacs, output_files: list[Path]) -> None:
    import socket

    from triaged.outputs.dimse import _associate, _read_item

    assoc = _associate([_read_item(output_files[0])], _destination(pacs.port), SendOptions())
    try:
        assert assoc.dul.socket is not None
        sock = assoc.dul.socket.socket
        assert sock is not None
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        assoc.release()
