"""Test certificates made with the openssl CLI: a CA, a server and client signed by it, and a rogue client.

Also server certificates for refusal paths: one expired (``-days -1``: not after is before not before) and
one whose names (``DNS:other.example``) do not match 127.0.0.1 or localhost, both signed by the CA.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path
    expired_server_cert: Path
    expired_server_key: Path
    wrong_name_server_cert: Path
    wrong_name_server_key: Path
    rogue_ca: Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def _ca(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        str(key),
        "-out",
        str(cert),
        "-days",
        "2",
        "-subj",
        f"/CN={name}",
    )
    return cert, key


def _leaf(
    directory: Path,
    name: str,
    ca: tuple[Path, Path],
    *,
    server: bool,
    days: int = 2,
    names: str = "IP:127.0.0.1,DNS:localhost",
) -> tuple[Path, Path]:
    key, csr, cert = directory / f"{name}.key", directory / f"{name}.csr", directory / f"{name}.pem"
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}")
    ext = directory / f"{name}.ext"
    ext.write_text(
        f"subjectAltName={names}\nextendedKeyUsage=serverAuth\n" if server else "extendedKeyUsage=clientAuth\n"
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(ca[0]),
        "-CAkey",
        str(ca[1]),
        "-CAcreateserial",
        "-out",
        str(cert),
        "-days",
        str(days),
        "-extfile",
        str(ext),
    )
    return cert, key


def make_certs(directory: Path) -> Certs:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl CLI")
    directory.mkdir(parents=True, exist_ok=True)
    ca = _ca(directory, "test-ca")
    rogue_ca = _ca(directory, "rogue-ca")
    server = _leaf(directory, "server", ca, server=True)
    client = _leaf(directory, "client", ca, server=False)
    rogue = _leaf(directory, "rogue", rogue_ca, server=False)
    expired = _leaf(directory, "expired-server", ca, server=True, days=-1)
    wrong_name = _leaf(directory, "wrong-name-server", ca, server=True, names="DNS:other.example")
    return Certs(
        ca[0], server[0], server[1], client[0], client[1], rogue[0], rogue[1], *expired, *wrong_name, rogue_ca[0]
    )
