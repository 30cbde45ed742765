"""The DHCP client of the firmware emulator: PXE firmware and iPXE, over a raw socket.

``DhcpPort`` is one AF_PACKET socket on one interface, shared by every
emulated machine on it (the fake kind puts 1,000 machines on one veth). It
sends Ethernet frames built by scapy around ``packets.build_request``
payloads, with each machine's own MAC as the source, and one receiver
thread hands each reply to the machine waiting for it, keyed by
``(xid, chaddr)``: a dictionary lookup per frame after a few byte
comparisons (``reply_key``), with no scapy on the receive path -- parsing
happens in the waiting machine's thread, only for its own replies.

On a veth no promiscuous mode is needed: a veth delivers every frame the
bridge sends it, and a packet socket sees frames for other MACs too
(``PACKET_OTHERHOST``). A real NIC filters by MAC in hardware, so on an
interface with a device behind it the socket joins ``PACKET_MR_PROMISC``
(dropped by the kernel when the socket closes).

``exchange`` is one client's DISCOVER/OFFER/REQUEST/ACK with retransmission
and backoff (``Timing``): 4, 8, 16, 32 s as PXE firmware does, 1, 2, 4, 8 s
as iPXE does, each randomised by up to a second either way (RFC 2131 4.1).
An address offer without a boot file waits ``proxy_wait`` for a proxyDHCP
offer (iPXE waits like that unless told "no-pxedhcp"); the boot file then
comes from the proxy offer.

``add_address`` puts a lease on the interface, as an extra address when
machines share it: ``promote_secondaries`` is set on the interface first, or
removing the first address (the primary) would take every other with it.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import queue
import random
import socket
import struct
import subprocess
import threading
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ..boot.dhcp.packets import (
    MalformedPacket,
    MessageType,
    Op,
    Opt,
    build_request,
    ip_bytes,
    parse,
)
from ..errors import RetryableError

log = logging.getLogger(__name__)

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_MR_PROMISC = 1
PACKET_OUTGOING = 4
RECV_BUFFER = 8 << 20
BROADCAST_MAC = "ff:ff:ff:ff:ff:ff"
CLIENT_PORT, SERVER_PORT = 68, 67

#: what PXE firmware asks for (option 55), as an Intel UNDI ROM does
PXE_PARAMETERS = bytes(
    [1, 2, 3, 4, 5, 6, 11, 12, 13, 15, 16, 17, 18, 22, 23, 28, 40, 41, 42, 43]
    + [50, 51, 54, 58, 59, 60, 66, 67, 97, 128, 129, 130, 131, 132, 133, 134, 135]
)
#: iPXE's request list and its encapsulated feature options (175): HTTP, TFTP, bzImage, version
IPXE_PARAMETERS = bytes([1, 3, 6, 7, 12, 15, 17, 26, 43, 60, 66, 67, 119, 128, 129, 130])
IPXE_PARAMETERS += bytes([131, 132, 133, 134, 135, 175, 203])
IPXE_FEATURES = bytes([0x13, 1, 1, 0x15, 1, 1, 0x18, 1, 1, 0xEB, 3, 1, 0, 0])


class DhcpFailed(RetryableError):
    """No lease: no offer, no acknowledgement, or a refusal (NAK) after every retry."""


class AddressError(RetryableError):
    """The leased address could not be put on the interface."""


class Cancelled(Exception):
    """The machine was powered off while it waited."""


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds to wait for an answer before each retransmission (then give up)."""

    waits: tuple[float, ...]
    jitter: float = 1.0  # +- seconds, RFC 2131 4.1
    proxy_wait: float = 2.0  # for a proxyDHCP offer after an address-only offer
    restarts: int = 2  # times the exchange starts over after a NAK or a lost ACK


PXE_TIMING = Timing((4.0, 8.0, 16.0, 32.0))
IPXE_TIMING = Timing((1.0, 2.0, 4.0, 8.0), jitter=0.25)


@dataclasses.dataclass(frozen=True)
class Lease:
    """What a DHCPACK gave: the address and the boot answer."""

    ip: str
    prefix: int
    server_id: str
    bootfile: str
    next_server: str
    router: str | None = None
    lease_time: int | None = None
    proxy: bool = False  # the boot answer came from a proxyDHCP offer

    @property
    def cidr(self) -> str:
        return f"{self.ip}/{self.prefix}"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def pxe_options(uuid: str, arch: int) -> tuple[tuple[int, bytes], ...]:
    """The options PXE firmware sends (PXE 2.1: 60, 93, 94, 97, 55, 57)."""
    return (
        (Opt.MAX_MESSAGE_SIZE, (1260).to_bytes(2, "big")),
        (Opt.PARAMETER_LIST, PXE_PARAMETERS),
        (Opt.CLIENT_UUID, b"\0" + uuidlib.UUID(uuid).bytes_le),  # SMBIOS byte order
        (Opt.CLIENT_NDI, bytes([1, 2, 1])),  # UNDI 2.1
        (Opt.CLIENT_ARCH, arch.to_bytes(2, "big")),
        (Opt.VENDOR_CLASS, f"PXEClient:Arch:{arch:05d}:UNDI:002001".encode()),
    )


def ipxe_options(uuid: str, arch: int, mac: str) -> tuple[tuple[int, bytes], ...]:
    """The options iPXE sends: its user class (77) and feature block (175) on top."""
    return (
        (Opt.MAX_MESSAGE_SIZE, (1472).to_bytes(2, "big")),
        (Opt.CLIENT_ARCH, arch.to_bytes(2, "big")),
        (Opt.CLIENT_NDI, bytes([1, 2, 1])),
        (Opt.VENDOR_CLASS, f"PXEClient:Arch:{arch:05d}:UNDI:002001".encode()),
        (Opt.USER_CLASS, b"iPXE"),
        (Opt.PARAMETER_LIST, IPXE_PARAMETERS),
        (Opt.IPXE, IPXE_FEATURES),
        (Opt.CLIENT_ID, b"\x01" + bytes.fromhex(mac.replace(":", ""))),
        (Opt.CLIENT_UUID, b"\0" + uuidlib.UUID(uuid).bytes_le),
    )


def reply_key(frame: bytes) -> tuple[tuple[int, bytes], bytes] | None:
    """A frame -> ((xid, chaddr), DHCP payload) if it is a BOOTREPLY to port 68, else None."""
    if len(frame) < 14 + 20 + 8 + 240 or frame[12:14] != b"\x08\x00":
        return None
    if frame[14] >> 4 != 4 or frame[23] != socket.IPPROTO_UDP:
        return None
    udp = 14 + (frame[14] & 0x0F) * 4
    if frame[udp + 2 : udp + 4] != b"\x00\x44":
        return None
    length = int.from_bytes(frame[udp + 4 : udp + 6], "big")
    payload = frame[udp + 8 : udp + max(length, 8)]
    if len(payload) < 240 or payload[0] != Op.BOOTREPLY:
        return None
    return (int.from_bytes(payload[4:8], "big"), payload[28:34]), payload


def frame(mac: str, payload: bytes) -> bytes:
    """A client's broadcast DHCP frame from ``mac``: 0.0.0.0:68 -> 255.255.255.255:67."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether

    packet = Ether(src=mac, dst=BROADCAST_MAC, type=0x0800)
    packet /= IP(src="0.0.0.0", dst="255.255.255.255", ttl=64, tos=0x10)
    packet /= UDP(sport=CLIENT_PORT, dport=SERVER_PORT)
    return bytes(packet / payload)


class DhcpPort:
    """One raw socket on ``interface`` for every machine on it. ``open()`` does the I/O."""

    def __init__(self, interface: str, *, promiscuous: bool | None = None) -> None:
        self.interface = interface
        self._promiscuous = promiscuous
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._inboxes: dict[tuple[int, bytes], queue.SimpleQueue] = {}
        self._lock = threading.Lock()
        self.received = self.delivered = 0

    def open(self) -> DhcpPort:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        try:
            sock.bind((self.interface, 0))
            try:
                sock.setsockopt(socket.SOL_SOCKET, 33, RECV_BUFFER)  # SO_RCVBUFFORCE
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECV_BUFFER)
            promiscuous = self._promiscuous
            if promiscuous is None:  # a real NIC filters by MAC; a veth does not
                promiscuous = Path(f"/sys/class/net/{self.interface}/device").exists()
            if promiscuous:
                index = socket.if_nametoindex(self.interface)
                mreq = struct.pack("iHH8s", index, PACKET_MR_PROMISC, 0, b"")
                sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, mreq)
            sock.settimeout(0.25)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._thread = threading.Thread(
            target=self._receive, name=f"dhcp-{self.interface}", daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        self._closing.set()
        if self._thread is not None:
            self._thread.join(2)
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> DhcpPort:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def _receive(self) -> None:
        sock = self._sock
        assert sock is not None
        while not self._closing.is_set():
            try:
                data, address = sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError as exc:
                if not self._closing.is_set():
                    log.error("DHCP port on %s: receiving stopped: %s", self.interface, exc)
                return
            if address[2] == PACKET_OUTGOING:
                continue
            found = reply_key(data)
            if found is None:
                continue
            self.received += 1
            inbox = self._inboxes.get(found[0])
            if inbox is not None:
                self.delivered += 1
                inbox.put(found[1])

    @contextmanager
    def subscribe(self, xid: int, mac: str) -> Iterator[queue.SimpleQueue]:
        """Replies to ``(xid, mac)`` arrive in the yielded queue while inside."""
        key = (xid, bytes.fromhex(mac.replace(":", "")))
        inbox: queue.SimpleQueue = queue.SimpleQueue()
        with self._lock:
            if key in self._inboxes:
                raise DhcpFailed(f"xid {xid:#x} of {mac} is in use already")
            self._inboxes[key] = inbox
        try:
            yield inbox
        finally:
            with self._lock:
                self._inboxes.pop(key, None)

    def send(self, mac: str, payload: bytes) -> None:
        if self._sock is None:
            raise DhcpFailed(f"the DHCP port on {self.interface} is not open")
        self._sock.send(frame(mac, payload))


def _lease(ack, offer_boot, payload: bytes) -> Lease:
    options = ack.options
    mask = options.get(Opt.SUBNET_MASK)
    prefix = ipaddress.IPv4Network(f"0.0.0.0/{socket.inet_ntoa(mask)}").prefixlen if mask else 24
    router = options.get(Opt.ROUTER)
    lease_time = options.get(Opt.LEASE_TIME)
    bootfile, next_server, proxy = _boot_of(ack, payload)
    if not bootfile and offer_boot is not None:
        bootfile, next_server, proxy = offer_boot
    return Lease(
        ip=ack.yiaddr,
        prefix=prefix,
        server_id=ack.server_id or ack.siaddr,
        bootfile=bootfile,
        next_server=next_server,
        router=socket.inet_ntoa(router[:4]) if router and len(router) >= 4 else None,
        lease_time=int.from_bytes(lease_time, "big") if lease_time else None,
        proxy=proxy,
    )


def _boot_of(msg, payload: bytes) -> tuple[str, str, bool]:
    """(boot file, next server, from a proxy) of a reply: option 67 or the file field."""
    name = msg.options.get(Opt.BOOTFILE, b"") or payload[108:236].split(b"\0", 1)[0]
    tftp = msg.options.get(Opt.TFTP_SERVER, b"").decode("latin-1").strip("\0")
    next_server = tftp or (msg.siaddr if msg.siaddr != "0.0.0.0" else msg.server_id or "")
    return name.decode("latin-1"), next_server, msg.yiaddr == "0.0.0.0"


class Exchange:
    """One client's DHCP exchange on a ``DhcpPort``. ``wait`` raises ``Cancelled``."""

    def __init__(
        self,
        port: DhcpPort,
        mac: str,
        options: tuple[tuple[int, bytes], ...],
        timing: Timing,
        *,
        rng: random.Random,
        cancelled: Callable[[], bool] = lambda: False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.port, self.mac, self.options, self.timing = port, mac, options, timing
        self.rng, self.cancelled, self.clock = rng, cancelled, clock
        self.sent = 0

    def _wait(self, inbox: queue.SimpleQueue, deadline: float) -> tuple | None:
        """The next parsed reply before ``deadline``, or None."""
        while True:
            if self.cancelled():
                raise Cancelled()
            left = deadline - self.clock()
            if left <= 0:
                return None
            try:
                payload = inbox.get(timeout=min(left, 1.0))  # and see a power-off
            except queue.Empty:
                continue
            try:
                return parse(payload), payload
            except MalformedPacket:
                continue

    def _deadline(self, wait: float) -> float:
        spread = self.rng.uniform(-self.timing.jitter, self.timing.jitter)
        return self.clock() + max(wait / 2, wait + spread)

    def _send(self, payload: bytes) -> None:
        self.port.send(self.mac, payload)
        self.sent += 1

    def run(self) -> Lease:
        for _ in range(self.timing.restarts + 1):
            xid = self.rng.getrandbits(32)
            with self.port.subscribe(xid, self.mac) as inbox:
                offer = self._select(inbox, xid)
                lease = self._request(inbox, xid, *offer)
            if lease is not None:
                return lease
        raise DhcpFailed(f"{self.mac}: no DHCPACK after {self.timing.restarts + 1} attempts")

    def _select(self, inbox: queue.SimpleQueue, xid: int) -> tuple:
        """DISCOVER until an address offer (and, if it has no boot file, a proxy's)."""
        discover = build_request(MessageType.DISCOVER, mac=self.mac, xid=xid, options=self.options)
        address = boot = None
        for wait in self.timing.waits:
            self._send(discover)
            deadline = self._deadline(wait)
            while (got := self._wait(inbox, deadline)) is not None:
                msg, payload = got
                if msg.message_type is not MessageType.OFFER:
                    continue
                name, server, proxy = _boot_of(msg, payload)
                if msg.yiaddr != "0.0.0.0" and address is None:
                    address = (msg, payload)
                    if not name:  # wait a little for a proxyDHCP offer with the boot file
                        deadline = min(deadline, self.clock() + self.timing.proxy_wait)
                if name and boot is None:
                    boot = (name, server, proxy)
                if address is not None and boot is not None:
                    return address, boot
            if address is not None:
                return address, boot
        raise DhcpFailed(
            f"{self.mac}: no DHCPOFFER after {len(self.timing.waits)} DHCPDISCOVERs "
            f"({sum(self.timing.waits):.0f} s)"
        )

    def _request(self, inbox: queue.SimpleQueue, xid: int, address: tuple, boot) -> Lease | None:
        offer, _ = address
        options = (
            *self.options,
            (Opt.REQUESTED_IP, ip_bytes(offer.yiaddr)),
            (Opt.SERVER_ID, ip_bytes(offer.server_id or offer.siaddr)),
        )
        request = build_request(MessageType.REQUEST, mac=self.mac, xid=xid, options=options)
        for wait in self.timing.waits:
            self._send(request)
            deadline = self._deadline(wait)
            while (got := self._wait(inbox, deadline)) is not None:
                msg, payload = got
                if msg.server_id not in (None, offer.server_id):
                    continue  # another server's late offer
                if msg.message_type is MessageType.NAK:
                    return None
                if msg.message_type is MessageType.ACK and msg.yiaddr != "0.0.0.0":
                    return _lease(msg, boot, payload)
        return None


# -- the leased address on the interface ----------------------------------------------------


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if proc.returncode != 0 and "File exists" not in proc.stderr:
        raise AddressError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


def add_address(interface: str, cidr: str) -> None:
    """An extra address on ``interface``; removing the first must not take the others."""
    promote = Path(f"/proc/sys/net/ipv4/conf/{interface}/promote_secondaries")
    try:
        if promote.read_text().strip() != "1":
            promote.write_text("1\n")
    except OSError as exc:
        log.warning("cannot set %s: %s", promote, exc)
    _ip("addr", "add", cidr, "dev", interface)


def remove_address(interface: str, cidr: str) -> None:
    proc = subprocess.run(["ip", "addr", "del", cidr, "dev", interface], capture_output=True)
    if proc.returncode != 0:
        log.debug("ip addr del %s dev %s: %s", cidr, interface, proc.stderr.strip())
