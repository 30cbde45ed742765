"""Before serving full mode: is another DHCP server already answering on the segment?

Two address servers on one segment hand out conflicting leases, and the
machines boot whichever answered first. So full mode first sends a
DHCPDISCOVER from port 68 out of the provisioning interface (broadcast flag
set, so the answer is broadcast back) and listens ``probe_seconds``, sending
once more halfway in case the first was lost. Any DHCPOFFER with an address
is another server: ``ForeignDhcpServer`` names it, unless ``--force``. A
proxyDHCP server (an offer without an address) is logged, not refused.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import time

from ...errors import ConfigError
from .packets import ZERO, MalformedPacket, MessageType, Op, Opt, build_request, parse
from .sockets import bound_socket

log = logging.getLogger(__name__)


class ForeignDhcpServer(ConfigError):
    """Another DHCP server answers on the provisioning segment."""

    def __init__(self, interface: str, servers: list[ServerSeen]) -> None:
        names = ", ".join(
            f"{s.address}" + (f" (offered {s.offered})" if s.offered else "") for s in servers
        )
        super().__init__(
            f"another DHCP server answers on {interface}: {names}. Stop it, serve next to it"
            " with --mode proxy, or start anyway with --force"
        )
        self.interface = interface
        self.servers = servers


@dataclasses.dataclass(frozen=True)
class ServerSeen:
    address: str  # its server identifier (option 54), else the source address
    offered: str | None  # the address it offered; None for a proxyDHCP offer
    source: str


async def find_dhcp_servers(
    interface: str, mac: str, seconds: float, *, ignore: frozenset[str] = frozenset()
) -> list[ServerSeen]:
    """Every DHCP server answering a DHCPDISCOVER on ``interface`` within ``seconds``."""
    loop = asyncio.get_running_loop()
    xid = secrets.randbits(32)
    discover = build_request(
        MessageType.DISCOVER,
        mac=mac,
        xid=xid,
        options=(
            (Opt.VENDOR_CLASS, b"metalseed-probe"),
            (Opt.PARAMETER_LIST, bytes([Opt.SUBNET_MASK, Opt.ROUTER, Opt.SERVER_ID])),
        ),
    )
    sock = bound_socket(interface, 68)
    seen: dict[str, ServerSeen] = {}
    try:
        deadline = time.monotonic() + seconds
        resend = time.monotonic() + seconds / 2
        await loop.sock_sendto(sock, discover, ("255.255.255.255", 67))
        while (left := deadline - time.monotonic()) > 0:
            if resend is not None and time.monotonic() >= resend:
                resend = None
                await loop.sock_sendto(sock, discover, ("255.255.255.255", 67))
            wait = min(left, resend - time.monotonic()) if resend else left
            try:
                data, (source, _port) = await asyncio.wait_for(
                    loop.sock_recvfrom(sock, 4096), max(wait, 0.001)
                )
            except TimeoutError:
                continue
            try:
                msg = parse(data)
            except MalformedPacket:
                continue
            if msg.op != Op.BOOTREPLY or msg.xid != xid or msg.message_type != MessageType.OFFER:
                continue
            address = msg.server_id or source
            if address in ignore:
                continue
            offered = msg.yiaddr if msg.yiaddr != ZERO else None
            if address not in seen:
                log.info(
                    "probe on %s: DHCP server %s offered %s",
                    interface,
                    address,
                    offered or "no address (proxyDHCP)",
                )
            seen[address] = ServerSeen(address, offered, source)
    finally:
        sock.close()
    return list(seen.values())


async def ensure_alone(interface: str, mac: str, seconds: float, *, server_ip: str) -> None:
    """Raise ``ForeignDhcpServer`` if an address server answers on ``interface``."""
    servers = await find_dhcp_servers(interface, mac, seconds, ignore=frozenset({server_ip}))
    address_servers = [s for s in servers if s.offered]
    for proxy in (s for s in servers if not s.offered):
        log.warning("a proxyDHCP server answers on %s: %s", interface, proxy.address)
    if address_servers:
        raise ForeignDhcpServer(interface, address_servers)
