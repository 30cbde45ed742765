"""The socket plumbing of the DHCP service: one interface, big buffers, kernel timestamps.

Every DHCP socket is bound to 0.0.0.0:PORT *and* to the interface
(SO_BINDTODEVICE): it neither sees nor answers anything arriving on another
interface, and its broadcasts leave through that interface only. The
interface's address comes from ``ip -j addr`` (iproute2, no new dependency).
"""

from __future__ import annotations

import ipaddress
import json
import socket
import struct
import subprocess

from ...errors import ConfigError

SOCKET_BUFFER = 4 << 20  # bytes: a 1,000-client DISCOVER burst fits with room to spare
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
TIMESTAMP_SPACE = socket.CMSG_SPACE(16)


def bound_socket(interface: str, port: int) -> socket.socket:
    """A UDP socket on 0.0.0.0:port that sees and sends only on ``interface``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
        sock.bind(("0.0.0.0", port))
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on UDP port {port} on {interface}: {exc}") from None
    return sock


def interface_facts(
    interface: str, prefer: str | None = None
) -> tuple[ipaddress.IPv4Interface, str]:
    """(address/prefix, MAC) of ``interface`` from ``ip -j addr``; ``prefer`` picks one."""
    proc = subprocess.run(
        ["ip", "-j", "addr", "show", "dev", interface], capture_output=True, text=True
    )
    if proc.returncode != 0 or not proc.stdout.strip():
        raise ConfigError(f"interface {interface!r} does not exist here")
    [info] = json.loads(proc.stdout)
    found = [
        ipaddress.IPv4Interface(f"{a['local']}/{a['prefixlen']}")
        for a in info.get("addr_info", [])
        if a.get("family") == "inet"
    ]
    if not found:
        raise ConfigError(f"interface {interface} has no IPv4 address; DHCP needs one to serve")
    chosen = next((f for f in found if str(f.ip) == prefer), found[0])
    return chosen, info.get("address", "")


def starts_exchange(data: bytes) -> bool:
    """A DHCPDISCOVER with option 53 first (as clients send it): a queueing hint only.

    Under load, requests that finish an exchange go first; a fresh DISCOVER can wait
    (its client retransmits). Anything else, odd layouts included, counts as finishing.
    """
    return data[240:243] == b"\x35\x01\x01"


def kernel_time(ancdata: list, default: float) -> float:
    """When the kernel received the datagram (SO_TIMESTAMPNS), else ``default``."""
    for level, kind, value in ancdata:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(value) >= 16:
            seconds, nanoseconds = struct.unpack("@qq", value[:16])
            return seconds + nanoseconds / 1e9
    return default


def grow_buffers(sock: socket.socket, size: int = SOCKET_BUFFER) -> None:
    """Buffers for a rack powering on at once, and kernel receive timestamps.

    As root, SO_*BUFFORCE may exceed net.core.[rw]mem_max; the timestamps tell how
    long a request waited before the service read it.
    """
    for force, plain in (
        (SO_RCVBUFFORCE, socket.SO_RCVBUF),
        (SO_SNDBUFFORCE, socket.SO_SNDBUF),
    ):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, plain, size)
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
