"""Network namespaces, bridges and veth links for the lab and the tests.

Everything is made inside namespaces this module creates: nothing is added to
the host's own namespace (the veth pairs are created inside the switch
namespace, then one end is moved). ``NetnsLab`` records what it made and
removes it in reverse order on ``close()``; deleting a namespace removes every
interface inside it. Processes started in a namespace are the caller's to stop
(by PID) before ``close()``.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import subprocess
from collections.abc import Sequence
from pathlib import Path

NETNS_DIR = Path("/run/netns")


class NetnsError(RuntimeError):
    pass


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {proc.stderr.strip() or proc.returncode}")
    return proc


@dataclasses.dataclass(frozen=True)
class Netns:
    name: str

    @property
    def prefix(self) -> list[str]:
        """Prepend to a command to run it inside this namespace."""
        return ["ip", "netns", "exec", self.name]

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return _ip("-n", self.name, *args, check=check)

    def run(self, cmd: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run([*self.prefix, *cmd], **kwargs)

    def popen(self, cmd: Sequence[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen([*self.prefix, *cmd], **kwargs)

    def exists(self) -> bool:
        return (NETNS_DIR / self.name).exists()


class NetnsLab:
    """Namespaces joined by bridges, made under one unique prefix and removed together."""

    def __init__(self, prefix: str | None = None) -> None:
        # short: interface names are limited to 15 characters, namespace names are not
        self.prefix = prefix or f"ms{os.getpid() % 10000}{secrets.token_hex(2)}"
        self._namespaces: list[Netns] = []
        self._links = 0

    def namespace(self, name: str) -> Netns:
        ns = Netns(f"{self.prefix}-{name}")
        _ip("netns", "add", ns.name)
        self._namespaces.append(ns)
        ns.ip("link", "set", "lo", "up")
        return ns

    def bridge(self, ns: Netns, name: str = "br0") -> str:
        ns.ip("link", "add", name, "type", "bridge")
        # forward at once: no STP listening delay before DHCP can pass
        ns.ip("link", "set", name, "type", "bridge", "forward_delay", "0", "stp_state", "0")
        ns.ip("link", "set", name, "up")
        return name

    def link(
        self,
        switch: Netns,
        bridge: str,
        ns: Netns,
        ifname: str = "eth0",
        *,
        mac: str | None = None,
        address: str | None = None,
    ) -> str:
        """A veth from ``ns`` (as ``ifname``) to ``bridge`` in ``switch``; returns the port name."""
        self._links += 1
        port = f"p{self._links}"
        peer = f"t{self._links}"
        switch.ip("link", "add", port, "type", "veth", "peer", "name", peer)
        switch.ip("link", "set", peer, "netns", ns.name)
        ns.ip("link", "set", peer, "name", ifname)
        if mac:
            ns.ip("link", "set", ifname, "address", mac)
        if address:
            ns.ip("addr", "add", address, "dev", ifname)
        ns.ip("link", "set", ifname, "up")
        switch.ip("link", "set", port, "master", bridge)
        switch.ip("link", "set", port, "up")
        return port

    def tap(self, switch: Netns, bridge: str, name: str) -> str:
        """A tap device on ``bridge`` (for a QEMU VM run inside ``switch``)."""
        switch.ip("tuntap", "add", "dev", name, "mode", "tap")
        switch.ip("link", "set", name, "master", bridge)
        switch.ip("link", "set", name, "up")
        return name

    def close(self) -> None:
        errors = []
        for ns in reversed(self._namespaces):
            if ns.exists():
                proc = _ip("netns", "del", ns.name, check=False)
                if proc.returncode != 0:
                    errors.append(f"{ns.name}: {proc.stderr.strip()}")
        self._namespaces.clear()
        if errors:
            raise NetnsError("could not remove namespaces: " + "; ".join(errors))

    def __enter__(self) -> NetnsLab:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
