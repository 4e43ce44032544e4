"""Orthanc as the PACS for end-to-end tests and benchmarks: own config in a temp dir, loopback, free ports.

Orthanc's DICOM server listens on every interface; tests only ever connect to 127.0.0.1. ``TCP_NODELAY=1``
is set in its environment (dcmtk, which Orthanc links, disables Nagle only then; see field notes).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port

ORTHANC_BINARY = "/usr/sbin/Orthanc"


def orthanc_binary() -> str:
    """Path of the Orthanc executable, or skip (fail in CI) with the reason."""
    found = shutil.which("Orthanc") or (ORTHANC_BINARY if Path(ORTHANC_BINARY).is_file() else None)
    if found is None:
        pytest.skip("needs Orthanc (Debian package orthanc)")
    return found


@dataclass
class Orthanc:
    """One Orthanc process; ``stop()``/``start()`` keep the same storage, index and ports."""

    root: Path
    modalities: dict[str, tuple[str, int]]  # name -> (AE title, port on 127.0.0.1)
    ae_title: str = "ORTHANC"
    # Orthanc refuses an association whose called AE title is not its own: senders must address it right.
    check_called_ae: bool = True
    http_port: int = field(default_factory=free_port)
    dicom_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    plugins: list[str] = field(default_factory=list)  # plugin .so files or folders (Orthanc's `Plugins`)
    users: dict[str, str] = field(default_factory=dict)  # HTTP basic auth for the REST API and DICOMweb
    extra_config: dict[str, Any] = field(default_factory=dict)  # e.g. {"DicomWeb": {...}}

    @property
    def config_path(self) -> Path:
        return self.root / "orthanc.json"

    def write_config(self) -> None:
        config: dict[str, Any] = {
            "Name": "triaged-test",
            "StorageDirectory": str(self.root / "storage"),
            "IndexDirectory": str(self.root / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.ae_title,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(self.users),
            "RegisteredUsers": self.users,
            "SslEnabled": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "DicomCheckCalledAet": self.check_called_ae,
            "DicomModalities": {name: [ae, "127.0.0.1", port] for name, (ae, port) in self.modalities.items()},
            "StableAge": 1,
            "Plugins": self.plugins,
            "SaveJobs": False,
            "ConcurrentJobs": 2,
            "DicomScuTimeout": 30,
            "DicomScpTimeout": 30,
            "HttpTimeout": 60,
            "StorageCompression": False,
            "OverwriteInstances": False,
            **self.extra_config,
        }
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")

    # -- lifecycle -----------------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> None:
        if not self.config_path.is_file():
            self.write_config()
        env = {**os.environ, "TCP_NODELAY": "1"}
        log = (self.root / "orthanc.log").open("ab")
        self.process = subprocess.Popen(
            [orthanc_binary(), str(self.config_path)], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.root
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.process.returncode}: {self.log_tail()}")
            try:
                self.get("/system", timeout=2)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"Orthanc REST API not up within {timeout} s: {self.log_tail()}")

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None

    def log_tail(self, chars: int = 2000) -> str:
        path = self.root / "orthanc.log"
        return path.read_text(errors="replace")[-chars:] if path.is_file() else ""

    # -- REST ----------------------------------------------------------------------------------------
    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    def request(self, method: str, path: str, body: bytes | None = None, timeout: float = 60.0) -> bytes:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        if self.users:
            user, password = next(iter(self.users.items()))
            headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        req = urllib.request.Request(self.url(path), data=body, method=method, headers=headers)
        with urllib.request.urlopen(req, timeout=timeout) as response:
            data: bytes = response.read()
            return data

    def get(self, path: str, timeout: float = 60.0) -> Any:
        return json.loads(self.request("GET", path, timeout=timeout))

    def get_bytes(self, path: str) -> bytes:
        return self.request("GET", path)

    def post(self, path: str, payload: Any, timeout: float = 120.0) -> Any:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        reply = self.request("POST", path, body, timeout=timeout)
        return json.loads(reply) if reply else None

    def upload(self, path: Path) -> str:
        """POST /instances; returns the Orthanc instance id."""
        reply = self.post("/instances", path.read_bytes())
        return str(reply["ID"])

    def push(self, modality: str, resources: list[str]) -> Any:
        """C-STORE ``resources`` (Orthanc ids) to ``modality`` and wait until the push finished."""
        return self.post(f"/modalities/{modality}/store", {"Resources": resources, "Synchronous": True})

    def study_instances(self, study_instance_uid: str) -> list[dict[str, Any]]:
        """Every instance of the study with its simplified main tags (via /tools/find)."""
        found = self.post(
            "/tools/find", {"Level": "Instance", "Query": {"StudyInstanceUID": study_instance_uid}, "Expand": True}
        )
        return list(found)

    def instance_tags(self, instance_id: str) -> dict[str, Any]:
        return dict(self.get(f"/instances/{instance_id}/tags?simplify"))


@contextmanager
def running_orthanc(root: Path, modalities: dict[str, tuple[str, int]]) -> Iterator[Orthanc]:
    """Start Orthanc (its REST API answering) and always stop it."""
    orthanc = Orthanc(root=root, modalities=modalities)
    orthanc.start()
    try:
        yield orthanc
    finally:
        orthanc.stop()
