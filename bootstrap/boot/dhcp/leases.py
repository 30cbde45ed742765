"""Full mode's address pool: offers, bindings, releases, declines, reservations.

The pool lives in memory (a boot storm must not wait on SQLite for every
packet) and writes through to the store whenever a binding changes: a bound,
released or declined lease is ``store.put_lease``-ed before the DHCPACK goes
out, so a restarted seed reloads every binding (``load``) and hands each MAC
the address it had.

Which address a MAC gets, in order: its reservation (``store.reserve``; the
handler pins one for every known node on its first DHCPACK, so cluster nodes
keep their address across restarts and lease expiry); the address it had
before (bound, released or expired); the one it asks for (option 50), if free;
the next never-used address of the pool; and only when those run out, the
address whose lease expired longest ago. An offer holds its address for
``offer_time``, in memory apart from the leases. A declined address is held
back from everyone for ``decline_time``. Expired leases stay in the store as
history (``expires`` says so) until their address goes to another MAC.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import time
from collections.abc import Callable

from ...errors import ConcurrentUpdate, ConfigError, MetalseedError
from ...models import Lease
from ...store import StateStore

log = logging.getLogger(__name__)

OFFERED, BOUND, RELEASED, DECLINED = "offered", "bound", "released", "declined"


def parse_pool(
    text: str, interface: ipaddress.IPv4Interface
) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]:
    """``"10.20.0.100-10.20.0.199"`` -> (first, last), both on the interface's subnet."""
    first_text, sep, last_text = text.partition("-")
    try:
        first = ipaddress.IPv4Address(first_text.strip())
        last = ipaddress.IPv4Address(last_text.strip()) if sep else first
    except ValueError:
        raise ConfigError(f"pool {text!r} is not START-END (two IPv4 addresses)") from None
    network = interface.network
    for address in (first, last):
        if address not in network:
            raise ConfigError(f"pool address {address} is not on {network} ({interface})")
    if first > last:
        raise ConfigError(f"pool {text!r} ends before it starts")
    return first, last


@dataclasses.dataclass(frozen=True)
class Nak:
    """A DHCPREQUEST the pool refuses, and why (goes into DHCPNAK's message option)."""

    reason: str


class LeasePool:
    def __init__(
        self,
        store: StateStore,
        interface: ipaddress.IPv4Interface,
        first: ipaddress.IPv4Address,
        last: ipaddress.IPv4Address,
        *,
        lease_time: int,
        offer_time: float = 60.0,
        decline_time: float = 600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._network = interface.network
        self._server = int(interface.ip)
        self._first, self._last = int(first), int(last)
        self._cursor = self._first
        self.lease_time = lease_time
        self._offer_time = offer_time
        self._decline_time = decline_time
        self._clock = clock
        self._by_ip: dict[int, Lease] = {}  # the store's leases, by address
        self._by_mac: dict[str, int] = {}  # MAC -> the address of its latest lease
        self._offers: dict[int, tuple[str, float]] = {}  # address -> (MAC, held until)
        self._offer_of: dict[str, int] = {}  # MAC -> offered address
        self._reserved: dict[str, int] = {}  # MAC -> reserved address
        self._reserved_ips: dict[int, str] = {}

    # -- loading ---------------------------------------------------------------------------

    def load(self) -> None:
        """Read leases and reservations from the store (on start)."""
        self._by_ip.clear()
        self._by_mac.clear()
        for lease in self._store.leases():
            try:
                ip = int(ipaddress.IPv4Address(lease.ip))
            except ValueError:
                continue
            if ipaddress.IPv4Address(ip) not in self._network:
                continue  # another interface's or an old config's: not ours to hand out
            self._by_ip[ip] = lease
            held = self._by_ip.get(self._by_mac.get(lease.mac, -1))
            if held is None or held.expires <= lease.expires:
                self._by_mac[lease.mac] = ip
        self.load_reservations()
        log.info(
            "lease pool %s-%s: %d leases, %d reservations loaded",
            ipaddress.IPv4Address(self._first),
            ipaddress.IPv4Address(self._last),
            len(self._by_ip),
            len(self._reserved),
        )

    def load_reservations(self) -> None:
        reserved = {}
        for mac, ip_text in self._store.reservations().items():
            try:
                reserved[mac] = int(ipaddress.IPv4Address(ip_text))
            except ValueError:
                continue
        self._reserved = reserved
        self._reserved_ips = {ip: mac for mac, ip in reserved.items()}

    # -- queries ---------------------------------------------------------------------------

    def mac_for(self, ip: str) -> str | None:
        """The MAC holding (or just offered) ``ip``, for TFTP and HTTP."""
        try:
            key = int(ipaddress.IPv4Address(ip))
        except ValueError:
            return None
        lease = self._by_ip.get(key)
        if lease is not None:
            return lease.mac
        offer = self._offers.get(key)
        return offer[0] if offer else None

    def lease_of(self, mac: str) -> Lease | None:
        ip = self._by_mac.get(mac)
        return self._by_ip.get(ip) if ip is not None else None

    def reserved(self, mac: str) -> str | None:
        ip = self._reserved.get(mac)
        return str(ipaddress.IPv4Address(ip)) if ip is not None else None

    # -- address choice --------------------------------------------------------------------

    def _in_pool(self, ip: int) -> bool:
        return self._first <= ip <= self._last

    def _assignable(self, ip: int) -> bool:
        address = ipaddress.IPv4Address(ip)
        return (
            address in self._network
            and ip != self._server
            and address != self._network.network_address
            and address != self._network.broadcast_address
        )

    def _usable_by(self, ip: int, mac: str, now: float) -> bool:
        """May ``mac`` have ``ip`` now (whether or not it is in the pool)?"""
        if not self._assignable(ip):
            return False
        owner = self._reserved_ips.get(ip)
        if owner is not None and owner != mac:
            return False
        offer = self._offers.get(ip)
        if offer is not None and offer[0] != mac and offer[1] > now:
            return False
        lease = self._by_ip.get(ip)
        if lease is None:
            return True
        if lease.state == DECLINED:
            return lease.expires <= now
        return lease.mac == mac or lease.state == RELEASED or lease.expires <= now

    def _allowed(self, ip: int, mac: str) -> bool:
        """In the pool, or reserved for this MAC."""
        return self._in_pool(ip) or self._reserved.get(mac) == ip

    def _next_free(self, now: float) -> int | None:
        """The next address nobody ever had (round-robin through the pool)."""
        for _ in range(self._last - self._first + 1):
            ip = self._cursor
            self._cursor = self._first if ip >= self._last else ip + 1
            if ip in self._by_ip or ip in self._reserved_ips or not self._assignable(ip):
                continue
            offer = self._offers.get(ip)
            if offer is None or offer[1] <= now:
                return ip
        return None

    def _oldest_reusable(self, mac: str, now: float) -> int | None:
        reusable = [
            (lease.expires, ip)
            for ip, lease in self._by_ip.items()
            if self._in_pool(ip) and self._usable_by(ip, mac, now)
        ]
        return min(reusable)[1] if reusable else None

    def _choose(self, mac: str, requested: str | None, now: float) -> int | None:
        for ip in (self._offer_of.get(mac), self._reserved.get(mac), self._by_mac.get(mac)):
            if ip is not None and self._allowed(ip, mac) and self._usable_by(ip, mac, now):
                return ip
        if requested is not None:
            try:
                ip = int(ipaddress.IPv4Address(requested))
            except ValueError:
                ip = None
            if ip is not None and self._in_pool(ip) and self._usable_by(ip, mac, now):
                lease = self._by_ip.get(ip)
                if lease is None or lease.mac == mac:
                    return ip
        return self._next_free(now) or self._oldest_reusable(mac, now)

    # -- transitions -----------------------------------------------------------------------

    def offer(self, mac: str, requested: str | None = None) -> str | None:
        """The address to offer ``mac`` (held for ``offer_time``), or None: pool exhausted."""
        now = self._clock()
        ip = self._choose(mac, requested, now)
        if ip is None:
            return None
        self.forget_offer(mac)
        self._offers[ip] = (mac, now + self._offer_time)
        self._offer_of[mac] = ip
        return str(ipaddress.IPv4Address(ip))

    def forget_offer(self, mac: str) -> None:
        """Let our offer to ``mac`` go (it chose another server, or took the address)."""
        ip = self._offer_of.pop(mac, None)
        if ip is not None and self._offers.get(ip, ("",))[0] == mac:
            del self._offers[ip]

    def request(
        self, mac: str, ip_text: str | None, *, node_id: str | None = None, hostname: str = ""
    ) -> Lease | Nak:
        """Bind ``ip_text`` to ``mac`` and persist it (DHCPACK), or say why not (DHCPNAK)."""
        if not ip_text:
            return Nak("no address requested")
        try:
            ip = int(ipaddress.IPv4Address(ip_text))
        except ValueError:
            return Nak(f"{ip_text!r} is not an address")
        if ipaddress.IPv4Address(ip) not in self._network:
            return Nak(f"{ip_text} is not on {self._network}")
        reserved = self._reserved.get(mac)
        if reserved is not None and reserved != ip:
            return Nak(f"{mac} has a reserved address, {ipaddress.IPv4Address(reserved)}")
        if not self._allowed(ip, mac):
            return Nak(f"{ip_text} is outside the pool")
        now = self._clock()
        if not self._usable_by(ip, mac, now):
            return Nak(f"{ip_text} is not available")
        lease = Lease(
            ip=ip_text,
            mac=mac,
            state=BOUND,
            expires=now + self.lease_time,
            hostname=hostname,
            node_id=node_id,
        )
        self._store.put_lease(lease)
        previous = self._by_mac.get(mac)
        if previous is not None and previous != ip:
            old = self._by_ip.get(previous)  # the client moved: its old address is free
            if old is not None and old.mac == mac and old.state != DECLINED:
                del self._by_ip[previous]
                self._store.delete_lease(old.ip)
        self._set(ip, lease)
        self.forget_offer(mac)
        return lease

    def release(self, mac: str, ip_text: str | None) -> Lease | None:
        """DHCPRELEASE: the address is free again (kept as the MAC's history)."""
        self.forget_offer(mac)
        lease = self._own(mac, ip_text)
        if lease is None or lease.state != BOUND:
            return None
        released = dataclasses.replace(lease, state=RELEASED, expires=self._clock())
        self._store.put_lease(released)
        self._set(int(ipaddress.IPv4Address(released.ip)), released)
        return released

    def decline(self, mac: str, ip_text: str | None) -> Lease | None:
        """DHCPDECLINE: another host answers on the address; hold it back for a while."""
        lease = self._own(mac, ip_text)
        if lease is None or lease.state != BOUND:
            offered = self._offer_of.get(mac)
            if offered is None or str(ipaddress.IPv4Address(offered)) != ip_text:
                return None
            lease = Lease(ip=ip_text, mac=mac, state=OFFERED, expires=0.0)
        self.forget_offer(mac)
        declined = dataclasses.replace(
            lease, state=DECLINED, expires=self._clock() + self._decline_time
        )
        self._store.put_lease(declined)
        self._set(int(ipaddress.IPv4Address(declined.ip)), declined)
        self._by_mac.pop(mac, None)  # its next DISCOVER gets another address
        return declined

    def reserve(self, mac: str, ip_text: str, node_id: str | None) -> bool:
        """Pin ``ip_text`` to ``mac`` in the store; True if that is new."""
        ip = int(ipaddress.IPv4Address(ip_text))
        if self._reserved.get(mac) == ip:
            return False
        try:
            self._store.reserve(mac, ip_text, node_id)
        except ConcurrentUpdate as exc:
            log.warning("cannot reserve %s for %s: %s", ip_text, mac, exc)
            return False
        old = self._reserved.get(mac)
        if old is not None:
            self._reserved_ips.pop(old, None)
        self._reserved[mac] = ip
        self._reserved_ips[ip] = mac
        return True

    def sweep(self) -> None:
        """Periodic: expired offers and declines let go; reservations re-read."""
        now = self._clock()
        for ip, (mac, until) in list(self._offers.items()):
            if until <= now:
                del self._offers[ip]
                if self._offer_of.get(mac) == ip:
                    del self._offer_of[mac]
        for ip, lease in list(self._by_ip.items()):
            if lease.state != DECLINED or lease.expires > now:
                continue
            del self._by_ip[ip]
            try:
                self._store.delete_lease(lease.ip)
            except MetalseedError as exc:
                log.warning("could not drop declined lease %s: %s", lease.ip, exc)
        try:
            self.load_reservations()
        except MetalseedError as exc:
            log.warning("could not re-read reservations: %s", exc)

    # -- helpers ---------------------------------------------------------------------------

    def _set(self, ip: int, lease: Lease) -> None:
        old = self._by_ip.get(ip)
        if old is not None and old.mac != lease.mac and self._by_mac.get(old.mac) == ip:
            del self._by_mac[old.mac]
        self._by_ip[ip] = lease
        self._by_mac[lease.mac] = ip

    def _own(self, mac: str, ip_text: str | None) -> Lease | None:
        if not ip_text:
            return None
        try:
            lease = self._by_ip.get(int(ipaddress.IPv4Address(ip_text)))
        except ValueError:
            return None
        return lease if lease is not None and lease.mac == mac else None
