"""The DHCP service of `metalseed serve`: sockets on one interface around ``DhcpHandler``.

``DhcpService.start()`` reads the interface's address, loads the lease pool
(full mode), probes the segment for another DHCP server (full mode, unless
``force``), binds UDP 0.0.0.0:67 -- and 4011 in proxy mode -- with
SO_BINDTODEVICE so nothing on another interface is ever seen or answered,
and starts the IPv6 router-advertisement responder. Replies to clients
without an address are broadcast to 255.255.255.255:68 out of that
interface (also when the client did not set the broadcast flag: unicast to a
client without an address would need ARP injection); a client with an
address (ciaddr) gets unicast; a relay on the interface's subnet (giaddr)
gets the reply on its port 67; proxyDHCP answers on 4011 go back to the
sender. Junk on the ports is logged (rate-limited) and dropped; the service
keeps serving.

Under load (a rack powering on at once) the sockets are drained into two
queues: requests that finish an exchange (DHCPREQUEST and the rest) are
answered before new DHCPDISCOVERs, and anything that waited longer than
``STALE_AFTER`` is dropped unanswered -- its client has retransmitted by then
-- so an overloaded seed keeps completing leases instead of answering stale
requests nobody waits for.

For tests until `metalseed serve` runs the whole set, the module runs alone::

    python -m bootstrap.boot.dhcp.server --interface prov0 --state-dir D \\
        --mode full --pool 10.20.0.100-10.20.0.199

and prints ``dhcp: serving ...`` to stderr once it answers.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import logging
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

from ...config import BootConfig
from ...errors import ConfigError, MetalseedError
from ...store import StateStore
from ..backend import BootBackend
from .decide import PXE_PORT, BootFiles, BootSettings, NetworkSettings
from .handler import FULL, DhcpHandler
from .leases import LeasePool, parse_pool
from .packets import MAX_LEN, MalformedPacket
from .probe import ensure_alone
from .ra import RaResponder
from .sockets import (
    TIMESTAMP_SPACE,
    bound_socket,
    grow_buffers,
    interface_facts,
    kernel_time,
    starts_exchange,
)

log = logging.getLogger(__name__)

DHCP_SERVER_PORT = 67
READ_BATCH = 256  # datagrams read per wake-up before the loop gets a turn
STALE_AFTER = 1.0  # seconds a request may wait before its client has given up on the answer
QUEUE_LIMIT = 20000  # datagrams waiting in memory; beyond that they are dropped on arrival
WORK_SLICE = 0.02  # seconds of answering before the event loop gets a turn


class _Throttle:
    """At most ``burst`` log lines per ``interval`` seconds; counts what it held back."""

    def __init__(self, interval: float = 10.0, burst: int = 5) -> None:
        self._interval, self._burst = interval, burst
        self._window = float("-inf")
        self._count = 0
        self.suppressed = 0

    def allow(self) -> bool:
        now = time.monotonic()
        if now - self._window >= self._interval:
            if self.suppressed:
                log.warning("%d more such warnings were suppressed", self.suppressed)
            self._window, self._count, self.suppressed = now, 0, 0
        self._count += 1
        if self._count > self._burst:
            self.suppressed += 1
            return False
        return True


class DhcpService:
    """DHCP (full or proxy) and IPv6 RA on one interface, answering through a ``BootBackend``."""

    def __init__(
        self,
        backend: BootBackend,
        store: StateStore,
        config: BootConfig,
        *,
        interface: str,
        server_ip: str,
        http_base: str,
        tftp_server: str,
        boot_files: BootFiles | None = None,
        sweep_interval: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._backend = backend
        self._store = store
        self._config = config
        self.interface = interface
        self.server_ip = server_ip
        self._settings = BootSettings(server_ip, http_base, tftp_server, boot_files or BootFiles())
        self._sweep_interval = sweep_interval
        self._clock = clock
        self.handler: DhcpHandler | None = None
        self._sockets: list[tuple[socket.socket, int]] = []
        self._ra: RaResponder | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._throttle = _Throttle()
        self._shed_throttle = _Throttle()
        self.shed = 0  # requests dropped unanswered because they waited too long
        self._finishing: collections.deque = collections.deque()  # REQUEST, RELEASE, ...
        self._starting: collections.deque = collections.deque()  # DISCOVER
        self._working = False

    def mac_for(self, ip: str) -> str | None:
        """The MAC behind a client address (for TFTP/HTTP); None before start or if unknown."""
        return self.handler.mac_for(ip) if self.handler is not None else None

    async def start(self) -> None:
        config = self._config
        address, mac = interface_facts(self.interface, prefer=self.server_ip)
        if str(address.ip) != self.server_ip:
            raise ConfigError(f"{self.server_ip} is not an address of {self.interface}")
        if config.mode == FULL:
            if not config.pool:
                raise ConfigError("full mode hands out addresses: give a pool, START-END")
            first, last = parse_pool(config.pool, address)
            pool = LeasePool(
                self._store, address, first, last, lease_time=config.lease_time, clock=self._clock
            )
            await asyncio.to_thread(pool.load)
            network = NetworkSettings(
                address, config.lease_time, config.router or None, tuple(config.dns)
            )
            if config.force:
                log.warning("not probing %s for other DHCP servers (force)", self.interface)
            else:
                await ensure_alone(
                    self.interface, mac, config.probe_seconds, server_ip=self.server_ip
                )
            handler = DhcpHandler(
                self._backend, self._settings, mode=FULL, pool=pool, network=network
            )
        else:
            handler = DhcpHandler(
                self._backend, self._settings, mode=config.mode, subnet=address.network
            )

        loop = asyncio.get_running_loop()
        ports = [DHCP_SERVER_PORT] + ([PXE_PORT] if config.mode != FULL else [])
        try:
            for port in ports:
                sock = bound_socket(self.interface, port)
                self._sockets.append((sock, port))
                grow_buffers(sock)
                loop.add_reader(sock.fileno(), self._readable, sock, port)
            if config.router_advertisements:
                ra = RaResponder(self.interface, mac)
                try:
                    await ra.start()
                    self._ra = ra
                except OSError as exc:  # IPv6 off on the interface: DHCP still works
                    log.warning("not answering router solicitations on %s: %s", self.interface, exc)
        except BaseException:
            await self.stop()
            raise
        self.handler = handler
        if handler.pool is not None:
            self._sweeper = loop.call_later(self._sweep_interval, self._sweep)
        log.info(
            "DHCP %s mode on %s (%s)%s%s",
            config.mode,
            self.interface,
            address,
            f", pool {config.pool}" if config.mode == FULL else "",
            ", answering router solicitations" if self._ra else "",
        )

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._ra is not None:
            await self._ra.stop()
            self._ra = None
        loop = asyncio.get_running_loop()
        for sock, _port in self._sockets:
            loop.remove_reader(sock.fileno())
            sock.close()
        self._sockets.clear()
        self._finishing.clear()
        self._starting.clear()
        self.handler = None

    def _sweep(self) -> None:
        if self.handler is None or self.handler.pool is None:
            return
        try:
            self.handler.pool.sweep()
        except MetalseedError as exc:
            log.warning("lease sweep: %s", exc)
        self._sweeper = asyncio.get_running_loop().call_later(self._sweep_interval, self._sweep)

    # -- receiving: drain the sockets, finish exchanges first, shed what waited too long ----------

    def _readable(self, sock: socket.socket, port: int) -> None:
        now = time.time()
        for _ in range(READ_BATCH):
            try:
                # longer than MAX_LEN is junk, and parse says so
                data, ancdata, _flags, addr = sock.recvmsg(MAX_LEN + 1, TIMESTAMP_SPACE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                log.debug("DHCP socket on port %d: %s", port, exc)
                break
            if len(self._finishing) + len(self._starting) >= QUEUE_LIMIT:
                self._shed_one(0.0)
                continue
            item = (kernel_time(ancdata, now), sock, data, addr, port)
            (self._starting if starts_exchange(data) else self._finishing).append(item)
        self._schedule()

    def _schedule(self) -> None:
        if not self._working and (self._finishing or self._starting):
            self._working = True
            asyncio.get_running_loop().call_soon(self._work)

    def _work(self) -> None:
        """Answer queued datagrams for a slice of time, then let the loop breathe."""
        self._working = False
        until = time.monotonic() + WORK_SLICE
        now = time.time()
        while self._finishing or self._starting:
            stamp, sock, data, addr, port = (self._finishing or self._starting).popleft()
            if now - stamp > STALE_AFTER:
                self._shed_one(now - stamp)
            else:
                self._received(sock, data, addr, port)
            if time.monotonic() > until:
                break
            now = time.time()
        self._schedule()

    def _shed_one(self, age: float) -> None:
        self.shed += 1
        if self._shed_throttle.allow():
            log.warning(
                "overloaded: dropped a request that waited %.1f s (%d dropped so far)",
                age,
                self.shed,
            )

    def _received(self, sock: socket.socket, data: bytes, addr, port: int) -> None:
        handler = self.handler
        if handler is None:
            return
        try:
            outgoing = handler.handle(data, addr, port)
        except MalformedPacket as exc:
            if self._throttle.allow():
                log.warning("dropped a bad packet from %s:%s on port %d: %s", *addr[:2], port, exc)
            return
        except MetalseedError as exc:
            log.warning("could not answer %s:%s on port %d: %s", *addr[:2], port, exc)
            return
        except Exception:  # a bug must not stop the service; say where it happened
            if self._throttle.allow():
                log.exception("error answering %s:%s on port %d", *addr[:2], port)
            return
        for out in outgoing:
            try:
                sock.sendto(out.data, out.address)
            except OSError as exc:  # full send buffer, unreachable unicast: the client retries
                if self._throttle.allow():
                    log.warning("could not send to %s:%s: %s", *out.address, exc)


# -- stand-alone runner (tests; `metalseed serve` wires the same class) ----------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bootstrap.boot.dhcp.server")
    parser.add_argument("--interface", required=True)
    parser.add_argument("--state-dir", required=True, type=Path)
    parser.add_argument("--mode", choices=["full", "proxy"], default="full")
    parser.add_argument("--pool", default="")
    parser.add_argument("--lease-time", type=int, default=3600)
    parser.add_argument("--router", default="")
    parser.add_argument("--dns", action="append", default=[])
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--probe-seconds", type=float, default=2.0)
    parser.add_argument("--http-port", type=int, default=80)
    parser.add_argument("--no-ra", action="store_true")
    parser.add_argument("--efi-x64", default=None, help="UEFI x86-64 binary (e.g. snponly.efi)")
    parser.add_argument("--efi-arm64", default=None, help="UEFI arm64 binary, if you have one")
    parser.add_argument("--log-level", default="info")
    return parser.parse_args(argv)


async def _run(args: argparse.Namespace) -> None:
    from ...secretbox import SecretBox
    from ...store.sqlite import SqliteStore
    from ..backend import StoreBackend

    config = BootConfig(
        interface=args.interface,
        mode=args.mode,
        pool=args.pool,
        lease_time=args.lease_time,
        router=args.router,
        dns=tuple(args.dns),
        force=args.force,
        probe_seconds=args.probe_seconds,
        http_port=args.http_port,
        router_advertisements=not args.no_ra,
    )
    address, _mac = interface_facts(args.interface)
    server_ip = str(address.ip)
    files = BootFiles()
    if args.efi_x64:
        files = dataclasses.replace(files, efi_x64=args.efi_x64, efi_ia32=args.efi_x64)
    if args.efi_arm64:
        files = dataclasses.replace(files, efi_arm64=args.efi_arm64)
    args.state_dir.mkdir(parents=True, exist_ok=True)
    store = SqliteStore(args.state_dir / "state.db", SecretBox(args.state_dir / "secret.key"))
    service = DhcpService(
        StoreBackend(store),
        store,
        config,
        interface=args.interface,
        server_ip=server_ip,
        http_base=f"http://{server_ip}:{args.http_port}",
        tftp_server=server_ip,
        boot_files=files,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await service.start()
        print(f"dhcp: serving on {args.interface} ({address}, {args.mode} mode)", file=sys.stderr)
        sys.stderr.flush()
        await stop.wait()
    finally:
        await service.stop()
        store.close()


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        asyncio.run(_run(args))
    except MetalseedError as exc:
        print(f"dhcp: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
