"""Hosts as Linux network namespaces on one virtual switch, for multi-host tests (iproute2, as root).

Each host is a network namespace with one veth pair: ``eth0`` inside the host, the other end plugged into a
bridge that lives in a dedicated *switch* namespace (not the root namespace, so the machine's own firewall and
``br_netfilter`` settings never see the test traffic). The test process itself is a host too: a veth from the
root namespace into the switch gives it the address ``.1``, from which it sends DICOM and inspects the database.
Only these addresses (and each namespace's loopback) are ever targets.

Names carry the creating process id (``tmh<pid>-<host>``), so two runs at once never collide, and namespaces
left by a run whose process is gone (a crash, a ``kill -9`` of pytest) are deleted, with whatever still runs
inside them, before a new network is built. A process started with :meth:`Network.command` gets its own UTS
namespace and the host's name as hostname: triaged derives worker and receiver ids from the hostname, as it
would on real machines.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field

PREFIX = "tmh"


class NetnsUnavailableError(RuntimeError):
    """Not root, no iproute2, or the kernel refuses network namespaces here."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def unavailable_reason() -> str | None:
    """Why namespaces cannot be built here (for a skip message), or None when they can."""
    if os.geteuid() != 0:
        return "needs root (ip netns, veth pairs)"
    if shutil.which("ip") is None or shutil.which("unshare") is None:
        return "needs iproute2 (ip) and util-linux (unshare)"
    probe = f"{PREFIX}{os.getpid()}-probe"
    added = _ip("netns", "add", probe, check=False)
    if added.returncode != 0:
        return f"ip netns add failed: {added.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner_pid(name: str) -> int | None:
    head = name.removeprefix(PREFIX).split("-", 1)[0].rstrip("r")
    return int(head) if name.startswith(PREFIX) and head.isdigit() else None


def remove_stale() -> list[str]:
    """Delete namespaces (and their processes) and root-side links of earlier runs whose process is gone."""
    removed = []
    listing = _ip("netns", "list", check=False).stdout.splitlines()
    for name in (line.split()[0] for line in listing if line.strip()):
        pid = _owner_pid(name)
        if pid is None or _alive(pid):
            continue
        for leftover in _ip("netns", "pids", name, check=False).stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(leftover), signal.SIGKILL)
        _ip("netns", "del", name, check=False)
        removed.append(name)
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        link = line.split(":")[1].strip().split("@")[0] if ":" in line else ""
        pid = _owner_pid(link)
        if pid is not None and not _alive(pid):
            _ip("link", "del", link, check=False)
            removed.append(link)
    return removed


def _subnet_for(pid: int) -> ipaddress.IPv4Network:
    """A /24 in 10.100.0.0–10.249.255.0 from the pid: distinct for concurrent runs, checked against routes."""
    subnet = ipaddress.IPv4Network(f"10.{100 + (pid >> 8) % 150}.{pid & 255}.0/24")
    for line in _ip("-4", "route", "show", "table", "all", check=False).stdout.splitlines():
        target = line.split()[0] if line.split() else ""
        if target in ("default", "local", "broadcast", "unreachable"):
            target = line.split()[1] if len(line.split()) > 1 else ""
        try:
            route = ipaddress.IPv4Network(target, strict=False)
        except ValueError:
            continue
        if route.prefixlen > 0 and route.overlaps(subnet):
            raise NetnsUnavailableError(f"the test subnet {subnet} overlaps the route {route} of this machine")
    return subnet


@dataclass
class Host:
    name: str
    namespace: str
    address: str


@dataclass
class Network:
    """One switch namespace with a bridge, the root namespace as host ``.1``, and hosts added on demand."""

    run_id: str = field(default_factory=lambda: f"{PREFIX}{os.getpid()}")
    hosts: dict[str, Host] = field(default_factory=dict)
    subnet: ipaddress.IPv4Network = field(init=False)
    root_address: str = field(init=False)
    _created: list[str] = field(default_factory=list)

    @property
    def switch(self) -> str:
        return f"{self.run_id}-switch"

    @property
    def root_link(self) -> str:
        return f"{self.run_id}r"  # ≤ 15 characters for pids up to 10 digits

    def create(self) -> None:
        """Build the switch and plug the root namespace in; raise :class:`NetnsUnavailableError` if it cannot."""
        remove_stale()
        self.subnet = _subnet_for(os.getpid())
        self.root_address = str(self.subnet.network_address + 1)
        try:
            self._add_namespace(self.switch)
            self._in(self.switch, "link", "add", "br0", "type", "bridge")
            self._in(self.switch, "link", "set", "br0", "up")
            _ip("link", "add", self.root_link, "type", "veth", "peer", "name", "root", "netns", self.switch)
            self._created.append(f"link:{self.root_link}")
            self._in(self.switch, "link", "set", "root", "master", "br0", "up")
            _ip("addr", "add", f"{self.root_address}/{self.subnet.prefixlen}", "dev", self.root_link)
            _ip("link", "set", self.root_link, "up")
        except subprocess.CalledProcessError as exc:
            self.destroy()
            raise NetnsUnavailableError(f"{' '.join(exc.cmd)}: {exc.stderr.strip()}") from exc

    def add_host(self, name: str) -> Host:
        """A namespace with loopback and ``eth0`` (the next free address), plugged into the switch."""
        if name in self.hosts:
            raise ValueError(f"host {name} exists")
        namespace = f"{self.run_id}-{name}"
        address = str(self.subnet.network_address + 2 + len(self.hosts))
        port = f"p{len(self.hosts)}"
        self._add_namespace(namespace)
        self._in(namespace, "link", "set", "lo", "up")
        self._in(namespace, "link", "add", "eth0", "type", "veth", "peer", "name", port, "netns", self.switch)
        self._in(self.switch, "link", "set", port, "master", "br0", "up")
        self._in(namespace, "addr", "add", f"{address}/{self.subnet.prefixlen}", "dev", "eth0")
        self._in(namespace, "link", "set", "eth0", "up")
        host = Host(name=name, namespace=namespace, address=address)
        self.hosts[name] = host
        return host

    def set_link(self, name: str, *, up: bool) -> None:
        """Cut (or restore) a host's only link, as pulling its network cable would."""
        self._in(self.hosts[name].namespace, "link", "set", "eth0", "up" if up else "down")

    def command(self, name: str, argv: Sequence[str], *, user: str | None = None) -> list[str]:
        """``argv`` run inside host ``name``, with the host's name as hostname (and as ``user`` if given).

        Every step execs the next, so the returned command's process id is the process of ``argv`` itself:
        a signal sent to it reaches the program, not a wrapper.
        """
        host = self.hosts[name]
        as_user = ["runuser", "-u", user, "--"] if user else []
        return [
            "ip", "netns", "exec", host.namespace,
            "unshare", "--uts",
            "sh", "-c", 'hostname "$0" && exec "$@"', host.name,
            *as_user, *argv,
        ]  # fmt: skip

    def pids(self, name: str) -> list[int]:
        return [int(p) for p in _ip("netns", "pids", self.hosts[name].namespace, check=False).stdout.split()]

    def destroy(self) -> None:
        """Kill anything still running in our namespaces, then delete them (their veth ends go with them)."""
        for host in self.hosts.values():
            for pid in self.pids(host.name):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for item in reversed(self._created):
            if item.startswith("link:"):
                _ip("link", "del", item.removeprefix("link:"), check=False)
            else:
                _ip("netns", "del", item, check=False)
        self._created.clear()
        self.hosts.clear()

    def _add_namespace(self, namespace: str) -> None:
        _ip("netns", "add", namespace)
        self._created.append(namespace)

    @staticmethod
    def _in(namespace: str, *args: str) -> None:
        _ip("-n", namespace, *args)
