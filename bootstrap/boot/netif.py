"""Facts about one network interface: its IPv4 address and prefix, its MAC.

Read with ``ip -j addr`` (iproute2 is already required) rather than a new
dependency. The boot services bind only to the interface they are given.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess

from ..errors import ConfigError


def _addr_show(interface: str) -> dict:
    proc = subprocess.run(
        ["ip", "-j", "addr", "show", "dev", interface], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise ConfigError(f"interface {interface!r} does not exist here")
    [info] = json.loads(proc.stdout)
    return info


def ipv4_interface(interface: str) -> ipaddress.IPv4Interface:
    """The interface's first IPv4 address with its prefix, e.g. ``10.20.0.1/24``."""
    for addr in _addr_show(interface).get("addr_info", []):
        if addr.get("family") == "inet":
            return ipaddress.IPv4Interface(f"{addr['local']}/{addr['prefixlen']}")
    raise ConfigError(f"interface {interface} has no IPv4 address; the seed needs one to serve")


def mac_address(interface: str) -> str:
    return _addr_show(interface).get("address", "")
