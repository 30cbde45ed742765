"""Answer IPv6 router solicitations so iPXE does not wait ~13 s for one.

iPXE solicits a router when its link comes up and, with nobody answering,
sits in "Configuring" until it gives up. One router advertisement ends that.
Ours says "no router here": router lifetime 0 (RFC 4861: not a default
router), no prefix, managed/other flags off -- so nobody routes through the
seed or starts DHCPv6, and iPXE carries on with IPv4 at once.

The RA goes to ff02::1 from the interface's link-local address, i.e. to
Ethernet 33:33:00:00:00:01 (iPXE drops it otherwise), with hop limit 255 (RFC
4861 receivers drop anything else). A raw ICMPv6 socket bound to the
interface (SO_BINDTODEVICE) joined to ff02::2 receives the solicitations,
filtered to type 133 in the kernel; the kernel fills in the checksum. scapy
builds the advertisement once.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import struct
import time
from collections.abc import Callable

from scapy.layers.inet6 import ICMPv6ND_RA, ICMPv6NDOptSrcLLAddr

log = logging.getLogger(__name__)

ROUTER_SOLICITATION = 133
ROUTER_ADVERTISEMENT = 134
ALL_NODES = "ff02::1"
ALL_ROUTERS = "ff02::2"
ICMP6_FILTER = 1  # <netinet/icmp6.h>; not exported by the socket module
IPV6_RECVHOPLIMIT = getattr(socket, "IPV6_RECVHOPLIMIT", 51)
IPV6_HOPLIMIT = getattr(socket, "IPV6_HOPLIMIT", 52)
RETRIES, RETRY_DELAY = 10, 0.5  # waiting out duplicate address detection (~1-2 s)


def build_ra(mac: str) -> bytes:
    """An RA that announces no router: lifetime 0, no prefix, M=O=0, our link-layer address."""
    packet = ICMPv6ND_RA(chlim=64, M=0, O=0, routerlifetime=0, reachabletime=0, retranstimer=0)
    packet = packet / ICMPv6NDOptSrcLLAddr(lladdr=mac)
    packet.cksum = 0  # the kernel computes ICMPv6 checksums on raw ICMPv6 sockets
    return bytes(packet)


def is_solicitation(data: bytes, hop_limit: int, *, own_mac: str) -> bool:
    """A router solicitation to answer: well-formed, from on-link, and not our own.

    RFC 4861 6.1.1: ICMP code 0 and hop limit 255. The seed's own kernel solicits
    when the link comes up, and joining ff02::2 loops that back to us: its source
    link-layer address option is our MAC, and it gets no answer.
    """
    if len(data) < 8 or data[0] != ROUTER_SOLICITATION or data[1] != 0 or hop_limit != 255:
        return False
    options = data[8:]
    while len(options) >= 8:
        kind, units = options[0], options[1]
        if units == 0:
            return False  # RFC 4861 4.6: a zero-length option is invalid
        if kind == 1 and options[2:8].hex(":") == own_mac.lower():
            return False
        options = options[units * 8 :]
    return True


def _only_type(kind: int) -> bytes:
    """An ICMP6_FILTER passing only ``kind`` (a set bit blocks that type)."""
    words = [0xFFFFFFFF] * 8
    words[kind >> 5] &= ~(1 << (kind & 31)) & 0xFFFFFFFF
    return struct.pack("=8I", *words)


class RaResponder:
    """Listens for router solicitations on one interface and answers with ``build_ra``."""

    def __init__(
        self,
        interface: str,
        mac: str,
        *,
        min_interval: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interface = interface
        self._mac = mac
        self._min_interval = min_interval
        self._clock = clock
        self._sock: socket.socket | None = None
        self._last_sent = float("-inf")
        self._ifindex = 0
        self._ra = b""
        self._pending: asyncio.TimerHandle | None = None
        self._retries = 0
        self.sent = 0

    async def start(self) -> None:
        self._ra = build_ra(self._mac)
        self._ifindex = socket.if_nametoindex(self.interface)
        sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, self.interface.encode())
            sock.setsockopt(socket.IPPROTO_ICMPV6, ICMP6_FILTER, _only_type(ROUTER_SOLICITATION))
            group = socket.inet_pton(socket.AF_INET6, ALL_ROUTERS) + struct.pack(
                "@I", self._ifindex
            )
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, group)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, self._ifindex)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVHOPLIMIT, 1)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)
        log.info("answering IPv6 router solicitations on %s", self.interface)

    async def stop(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None
        if self._sock is not None:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None

    def _readable(self) -> None:
        assert self._sock is not None
        for _ in range(64):  # drain, but never starve the loop
            try:
                data, ancdata, _flags, source = self._sock.recvmsg(1500, socket.CMSG_SPACE(4))
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("router solicitation socket: %s", exc)
                return
            hop_limit = next(
                (
                    struct.unpack("@i", value[:4])[0]
                    for level, kind, value in ancdata
                    if level == socket.IPPROTO_IPV6 and kind == IPV6_HOPLIMIT and len(value) >= 4
                ),
                255,
            )
            if is_solicitation(data, hop_limit, own_mac=self._mac):
                self._answer(source[0])

    def _answer(self, source: str) -> None:
        log.debug("router solicitation on %s from %s", self.interface, source)
        wait = self._last_sent + self._min_interval - self._clock()
        if wait > 0:  # rate-limited: one more RA when allowed answers every soliciter since
            if self._pending is None:
                loop = asyncio.get_running_loop()
                self._pending = loop.call_later(wait, self._send)
            return
        self._send()

    def _send(self) -> None:
        self._pending = None
        if self._sock is None:
            return
        try:
            self._sock.sendto(self._ra, (ALL_NODES, 0, 0, self._ifindex))
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL and self._retries < RETRIES:
                # our link-local address is still tentative (DAD): the link just came up,
                # and so did the soliciting machine's -- answer once the address is ours
                self._retries += 1
                self._pending = asyncio.get_running_loop().call_later(RETRY_DELAY, self._send)
                return
            log.warning("could not send a router advertisement on %s: %s", self.interface, exc)
            self._retries = 0
            return
        self._retries = 0
        self._last_sent = self._clock()
        self.sent += 1
