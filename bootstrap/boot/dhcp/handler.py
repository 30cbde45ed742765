"""One DHCP packet in, the replies out: parse, identify, decide, lease, build, record.

Synchronous and socket-free, so unit tests and the speed measurement drive
it directly; ``DhcpService`` (server.py) only moves bytes between sockets and
``DhcpHandler.handle``. Every step is recorded through the backend
(``dhcp.discover``, ``dhcp.offer``, ``dhcp.request``, ``dhcp.ack``,
``dhcp.nak``, ``dhcp.release``, ``dhcp.decline``, ``dhcp.proxy-offer``) with
small JSON data: the address, the architecture, the client kind. Renewals and
DHCPINFORMs come from running systems, not from machines booting: they update
the lease but are only logged (debug), so a cluster's events are not one
renewal after another.

Relayed messages (giaddr set) are answered through the relay (unicast to
giaddr:67) when the relay sits on the interface's own subnet -- a relay on
the segment, or ISC perfdhcp, which always poses as one. A relay for another
subnet is not served: the pool is the interface's subnet only.
"""

from __future__ import annotations

import collections
import dataclasses
import ipaddress
import logging
import time
from collections.abc import Mapping
from typing import Any

from ...errors import MetalseedError
from ..backend import BootBackend, BootProfile, Machine
from . import decide
from .decide import (
    Boot,
    BootSettings,
    Client,
    ClientKind,
    Destination,
    NetworkSettings,
    Reply,
    RequestState,
)
from .leases import LeasePool, Nak
from .packets import ZERO, DhcpMessage, MessageType, Op, build_reply, parse

log = logging.getLogger(__name__)

FULL, PROXY = "full", "proxy"


@dataclasses.dataclass(frozen=True)
class Outgoing:
    """Bytes to send and where: ``(address, port)``."""

    data: bytes
    address: tuple[str, int]


class DhcpHandler:
    """Answers DHCP messages for one interface in full or proxy mode."""

    def __init__(
        self,
        backend: BootBackend,
        settings: BootSettings,
        *,
        mode: str,
        pool: LeasePool | None = None,
        network: NetworkSettings | None = None,
        subnet: ipaddress.IPv4Network | None = None,
    ) -> None:
        if mode == FULL and (pool is None or network is None):
            raise ValueError("full mode needs a lease pool and network settings")
        self._backend = backend
        self._settings = settings
        self.mode = mode
        self.pool = pool
        self._network = network
        self._no_boot_logged: set[tuple[str, str]] = set()
        self._remote_relays_logged: set[str] = set()
        self._exhausted_logged = float("-inf")
        if subnet is None:
            subnet = network.interface.network if network else ipaddress.IPv4Network("0.0.0.0/32")
        self._subnet = subnet  # relays on it are served
        #: proxy mode: addresses seen in clients' requests, for TFTP/HTTP (bounded)
        self._seen: collections.OrderedDict[str, str] = collections.OrderedDict()

    # -- entry point ---------------------------------------------------------------------------

    def handle(self, data: bytes, source: tuple[str, int], port: int) -> list[Outgoing]:
        """Answer one datagram that arrived on ``port``; ``MalformedPacket`` for junk."""
        msg = parse(data)
        if msg.op != Op.BOOTREQUEST:
            return []
        if msg.giaddr != ZERO and not self._local_relay(msg.giaddr):
            if (
                msg.giaddr not in self._remote_relays_logged
                and len(self._remote_relays_logged) < 64
            ):
                self._remote_relays_logged.add(msg.giaddr)
                log.warning("not serving relay %s: not on this interface's subnet", msg.giaddr)
            return []
        if self.mode == FULL:
            reply = self._full(msg)
        else:
            reply = self._proxy(msg, port)
        if reply is None:
            return []
        return [Outgoing(self._build(msg, reply), self._address(msg, reply, source))]

    def _local_relay(self, giaddr: str) -> bool:
        return ipaddress.IPv4Address(giaddr) in self._subnet

    def mac_for(self, ip: str) -> str | None:
        """The MAC behind a client address, for TFTP and HTTP (which see only the address)."""
        if self.pool is not None:
            mac = self.pool.mac_for(ip)
            if mac:
                return mac
        return self._seen.get(ip)

    # -- full mode -----------------------------------------------------------------------------

    def _full(self, msg: DhcpMessage) -> Reply | None:
        assert self.pool is not None and self._network is not None
        kind = msg.message_type
        machine = self._identify(msg)
        client = decide.classify(msg)
        data = {"client": str(client.kind), "arch": str(client.arch)}
        if kind is MessageType.DISCOVER:
            self._record(msg.mac, "dhcp.discover", f"DHCPDISCOVER ({client.kind})", data)
            ip = self.pool.offer(msg.mac, msg.requested_ip)
            if ip is None:
                now = time.monotonic()
                if now - self._exhausted_logged > 10:
                    self._exhausted_logged = now
                    log.warning(
                        "pool exhausted: no address to offer %s (and maybe others)", msg.mac
                    )
                return None
            boot = self._boot(msg, client, machine, proxy=False)
            return decide.lease_reply(
                MessageType.OFFER, msg, client, machine, boot, self._network, ip
            )
        if kind is MessageType.REQUEST:
            return self._request(msg, client, machine, data)
        if kind is MessageType.RELEASE:
            lease = self.pool.release(msg.mac, msg.ciaddr)
            if lease is not None:
                self._record(msg.mac, "dhcp.release", f"DHCPRELEASE {lease.ip}", {"ip": lease.ip})
            return None
        if kind is MessageType.DECLINE:
            lease = self.pool.decline(msg.mac, msg.requested_ip)
            if lease is not None:
                log.warning("%s declined %s: another host uses it", msg.mac, lease.ip)
                self._record(
                    msg.mac, "dhcp.decline", f"DHCPDECLINE {lease.ip}: in use", {"ip": lease.ip}
                )
            return None
        if kind is MessageType.INFORM:
            boot = self._boot(msg, client, machine, proxy=False)
            return decide.inform_reply(msg, client, machine, boot, self._network)
        return None

    def _request(
        self, msg: DhcpMessage, client: Client, machine: Machine, data: dict[str, Any]
    ) -> Reply | None:
        assert self.pool is not None and self._network is not None
        state = decide.request_state(msg)
        server_ip = self._network.server_ip
        if state is RequestState.INVALID:
            return None
        if state is RequestState.SELECTING and msg.server_id != server_ip:
            self.pool.forget_offer(msg.mac)  # it chose another server's offer
            return None
        ip = msg.ciaddr if state is RequestState.RENEWING else msg.requested_ip
        if state is RequestState.RENEWING:
            log.debug("DHCPREQUEST %s from %s (renewing)", ip, msg.mac)
        else:
            self._record(
                msg.mac, "dhcp.request", f"DHCPREQUEST {ip} ({state})", {**data, "ip": ip or ""}
            )
        result = self.pool.request(
            msg.mac, ip, node_id=machine.node_id, hostname=machine.hostname or msg.hostname
        )
        if isinstance(result, Nak):
            return decide.nak_reply(msg, client, server_ip, result.reason)
        if machine.node_id is not None and self.pool.reserve(msg.mac, result.ip, machine.node_id):
            log.info("reserved %s for node %s (%s)", result.ip, machine.node_id, msg.mac)
        boot = self._boot(msg, client, machine, proxy=False)
        return decide.lease_reply(
            MessageType.ACK, msg, client, machine, boot, self._network, result.ip
        )

    # -- proxy mode ----------------------------------------------------------------------------

    def _proxy(self, msg: DhcpMessage, port: int) -> Reply | None:
        kind = msg.message_type
        seen = msg.ciaddr if msg.ciaddr != ZERO else msg.requested_ip
        if seen and kind in (MessageType.REQUEST, MessageType.INFORM):
            self._remember(seen, msg.mac)
        client = decide.classify(msg)
        if client.kind not in (ClientKind.PXE, ClientKind.IPXE, ClientKind.HTTP):
            return None  # not a network-boot client: the address server's business alone
        if port == decide.PXE_PORT:
            if kind not in (MessageType.REQUEST, MessageType.INFORM):
                return None
        elif kind is not MessageType.DISCOVER:
            return None
        machine = self._identify(msg)
        data = {"client": str(client.kind), "arch": str(client.arch), "proxy": True}
        event = "dhcp.discover" if kind is MessageType.DISCOVER else "dhcp.request"
        self._record(msg.mac, event, f"DHCP{kind.name} ({client.kind}, proxy)", data)
        boot = self._boot(msg, client, machine, proxy=True)
        if boot is None:
            return None
        return decide.proxy_reply(msg, boot, self._settings.server_ip, port=port)

    def _remember(self, ip: str, mac: str) -> None:
        self._seen[ip] = mac
        self._seen.move_to_end(ip)
        while len(self._seen) > 4096:
            self._seen.popitem(last=False)

    # -- helpers -------------------------------------------------------------------------------

    def _identify(self, msg: DhcpMessage) -> Machine:
        try:
            return self._backend.identify(msg.mac, msg.uuid)
        except MetalseedError as exc:
            log.warning("cannot identify %s, booting it as unknown: %s", msg.mac, exc)
            return Machine(msg.mac, None, None, BootProfile.ENLIST)

    def _record(self, mac: str, kind: str, message: str, data: Mapping[str, Any]) -> None:
        try:
            self._backend.record(mac, kind, message, data)
        except MetalseedError as exc:
            log.warning("could not record %s for %s: %s", kind, mac, exc)

    def _boot(
        self, msg: DhcpMessage, client: Client, machine: Machine, *, proxy: bool
    ) -> Boot | None:
        boot = decide.boot_for(msg, client, machine, self._settings, proxy=proxy)
        if boot is None and client.kind is not ClientKind.OTHER:
            key = (msg.mac, str(client.arch))
            if key not in self._no_boot_logged and len(self._no_boot_logged) < 10000:
                self._no_boot_logged.add(key)
                why = (
                    "the machine is retired"
                    if machine.profile is BootProfile.RETIRED
                    else f"no iPXE binary is configured for {client.arch}"
                )
                log.warning("%s (%s) gets no boot file: %s", msg.mac, client.kind, why)
        return boot

    def _build(self, msg: DhcpMessage, reply: Reply) -> bytes:
        if msg.ciaddr != ZERO and reply.event == "dhcp.ack" and not reply.data.get("proxy"):
            log.debug("%s to %s", reply.message, msg.mac)  # a renewal or an inform
        else:
            self._record(msg.mac, reply.event, reply.message, reply.data)
        return build_reply(
            msg,
            broadcast=reply.message_type is MessageType.NAK,
            options=reply.options,
            yiaddr=reply.yiaddr,
            siaddr=reply.siaddr,
            ciaddr=reply.ciaddr,
            file=reply.file,
        )

    @staticmethod
    def _address(msg: DhcpMessage, reply: Reply, source: tuple[str, int]) -> tuple[str, int]:
        if msg.giaddr != ZERO:  # RFC 2131 4.1: through the relay, to its server port
            return msg.giaddr, decide.DHCP_PORT
        if reply.destination is Destination.SOURCE and source[0] != ZERO:
            return source[0], source[1]
        if reply.destination is Destination.CLIENT:
            return msg.ciaddr, decide.CLIENT_PORT
        return "255.255.255.255", decide.CLIENT_PORT
