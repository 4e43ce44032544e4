"""Run the real :class:`Receiver` in-process on 127.0.0.1 and talk to it with real peers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from triaged.config import Settings
from triaged.db.models import Instance
from triaged.dicom.contexts import pynetdicom_config
from triaged.dicom.synthetic import write_mr_series
from triaged.outputs.send import SendResult, read_dicom_file, send_files
from triaged.receive.scp import Receiver
from triaged.receive.storage import InstanceStore

CALLING_AE = "TESTSCU"


def receiver_settings(
    make_settings: Callable[..., Settings], *, dicom: dict[str, Any] | None = None, **kw: Any
) -> Settings:
    """Settings for a loopback receiver; ``dicom`` keys override the DICOM section."""
    section: dict[str, Any] = {"bind_address": "127.0.0.1", "ae_title": "TRIAGED"}
    section.update(dicom or {})
    kw.setdefault("storage", {"min_free_bytes": 0})
    return make_settings(dicom=section, **kw)


@contextmanager
def running_receiver(
    settings: Settings, session_factory: sessionmaker[Session], *, port: int = 0
) -> Iterator[Receiver]:
    """A started receiver (pynetdicom switches restored afterwards)."""
    with pynetdicom_config():
        store = InstanceStore(settings.storage_dir, settings.storage.min_free_bytes)
        receiver = Receiver(settings, session_factory, store, port=port)
        receiver.start()
        try:
            yield receiver
        finally:
            receiver.stop(timeout=5)


def send(receiver: Receiver, paths: Sequence[Path], *, calling_ae: str = CALLING_AE, **kwargs: Any) -> list[SendResult]:
    files = [read_dicom_file(p) for p in paths]
    return send_files(
        files,
        "127.0.0.1",
        receiver.port,
        called_ae_title=receiver.settings.dicom.ae_title,
        calling_ae_title=calling_ae,
        **kwargs,
    )


def synthetic_series(out_dir: Path, n: int = 3, *, seed: int = 0, size: int = 32, **kwargs: Any) -> list[Path]:
    rng = np.random.default_rng(seed)
    slices = [rng.random((size, size)) for _ in range(n)]
    return write_mr_series(slices, out_dir, seed=seed, **kwargs)


def dataset_bytes(path: Path) -> bytes:
    """The bytes of a Part 10 file after its File Meta Information group."""

    data = path.read_bytes()
    offset = _meta_end(data)
    return data[offset:]


def meta_end(path: Path) -> int:
    """Offset of the data set in a Part 10 file (reads only its head)."""
    with path.open("rb") as f:
        return _meta_end(f.read(1 << 16))


def spawn_receiver(overrides: dict[str, Any], workdir: Path, name: str) -> tuple[subprocess.Popen[bytes], int]:
    """A receiver in its own process (:mod:`tests.support.receiver_main`); returns it and its port."""
    repo_root = Path(__file__).resolve().parents[2]
    port_file = workdir / f"{name}.port"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.support.receiver_main", json.dumps(overrides), str(port_file)],
        cwd=repo_root,
        env={**os.environ, "PYTHONPATH": str(repo_root)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(lambda: port_file.exists() or proc.poll() is not None, timeout=60)
    assert proc.poll() is None, "receiver process exited early"
    return proc, int(port_file.read_text())


def _meta_end(data: bytes) -> int:
    """Offset just past the (0002,xxxx) group: preamble 128 + 'DICM' + group length element + its value."""
    assert data[128:132] == b"DICM", "not a Part 10 file"
    # (0002,0000) UL, explicit VR little endian: tag(4) VR(2) len(2) value(4)
    assert data[132:136] == b"\x02\x00\x00\x00", "file meta must start with its group length"
    group_length = int.from_bytes(data[140:144], "little")
    return 144 + group_length


def instance_rows(session_factory: sessionmaker[Session]) -> list[Instance]:
    with session_factory() as session:
        return list(session.scalars(select(Instance).order_by(Instance.id)))


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s")


def dcmtk(name: str) -> str:
    """dcmtk's ``name`` (never pynetdicom's app of the same name in the venv: see :func:`dicom_tools.tool`)."""
    from tests.support.dicom_tools import tool

    return tool(name, "dcmtk")


def run_dcmtk(args: Sequence[str], *, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TCP_NODELAY": "1"}
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, env=env, check=False)
