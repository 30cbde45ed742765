"""`metalseed serve`: the seed's boot services on the provisioning interface.

HTTP (iPXE scripts, images, call-backs), TFTP (iPXE binaries only), DHCP
(full or proxy, with the IPv6 router-advertisement answer iPXE wants) -- all
bound to one interface and its address, all reading and writing node state
only through the ``BootBackend``. Started in that order (DHCP last: a
machine must not be told to fetch from a server that is not up yet) and
stopped in reverse. One ``serve`` per state directory, enforced with a lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from ..config import Config
from ..errors import UsageError
from ..image.catalogue import Catalogue
from ..secretbox import SecretBox
from ..store.sqlite import SqliteStore
from .backend import StoreBackend
from .netif import ipv4_interface

log = logging.getLogger(__name__)

STATUS_FILE = "serve.json"
LOCK_FILE = "serve.lock"


@dataclasses.dataclass(frozen=True)
class ServeInfo:
    """What a running ``serve`` writes to ``STATE_DIR/serve.json`` once every service is up."""

    pid: int
    interface: str
    address: str
    network: str
    mode: str
    seed_url: str
    http_port: int
    tftp_port: int
    started: float

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@contextlib.contextmanager
def _single_instance(state_dir: Path) -> Iterator[None]:
    state_dir.mkdir(parents=True, exist_ok=True)
    with (state_dir / LOCK_FILE).open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(
                f"another `metalseed serve` is running on state directory {state_dir}"
            ) from None
        yield


class LeaseMacs:
    """IP -> MAC for TFTP and HTTP, which see only the client address.

    Asks the DHCP service first (it knows what it just handed out or saw),
    then the persisted leases; a short cache keeps this off the store's back.
    """

    def __init__(self, store: SqliteStore, ttl: float = 5.0) -> None:
        self._store = store
        self._ttl = ttl
        self._cache: dict[str, str] = {}
        self._loaded = 0.0
        self.dhcp_lookup: Callable[[str], str | None] | None = None

    def __call__(self, ip: str) -> str | None:
        if self.dhcp_lookup is not None:
            mac = self.dhcp_lookup(ip)
            if mac:
                return mac
        now = time.monotonic()
        if ip not in self._cache and now - self._loaded > self._ttl:
            self._cache = {lease.ip: lease.mac for lease in self._store.leases()}
            self._loaded = now
        return self._cache.get(ip)


async def serve(config: Config, *, on_ready: Callable[[ServeInfo], None] | None = None) -> None:
    """Run the boot services until SIGTERM or SIGINT."""
    from .dhcp.server import DhcpService
    from .http import HttpService, make_app
    from .tftp import TftpService

    boot = config.boot
    if not boot.interface:
        raise UsageError("name the provisioning interface: --interface IF (or boot.interface)")
    if boot.mode == "full" and not boot.pool:
        raise UsageError("full mode hands out addresses: give --pool START-END (or boot.pool)")
    iface = ipv4_interface(boot.interface)
    address = str(iface.ip)
    seed_url = f"http://{address}" + ("" if boot.http_port == 80 else f":{boot.http_port}")

    with _single_instance(config.state_dir):
        store = SqliteStore(config.db_path, SecretBox(config.key_path))
        backend = StoreBackend(store, token_ttl=boot.token_ttl)
        catalogue = Catalogue(config.images_dir)
        if catalogue.current() is None:
            log.warning(
                "no current boot image in %s: machines get a wait-and-retry script", catalogue.root
            )
        mac_for = LeaseMacs(store)
        http = HttpService(make_app(backend, catalogue, boot, seed_url=seed_url, mac_for=mac_for))
        tftp = TftpService(
            boot.ipxe_dir, backend, address=address, port=boot.tftp_port, mac_for=mac_for
        )
        dhcp = DhcpService(
            backend,
            store,
            boot,
            interface=boot.interface,
            server_ip=address,
            http_base=seed_url,
            tftp_server=address,
        )
        mac_for.dhcp_lookup = getattr(dhcp, "mac_for", None)

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

        status = config.state_dir / STATUS_FILE
        started: list = []
        try:
            await http.start(address, boot.http_port)
            started.append(http)
            tftp.start()
            started.append(tftp)
            await dhcp.start()
            started.append(dhcp)
            info = ServeInfo(
                pid=os.getpid(),
                interface=boot.interface,
                address=address,
                network=str(iface.network),
                mode=boot.mode,
                seed_url=seed_url,
                http_port=boot.http_port,
                tftp_port=boot.tftp_port,
                started=time.time(),
            )
            tmp = status.with_suffix(".tmp")
            tmp.write_text(json.dumps(info.to_json(), indent=2) + "\n")
            os.replace(tmp, status)
            log.info(
                "serving on %s (%s): DHCP %s mode%s, TFTP port %d, HTTP %s",
                boot.interface,
                iface,
                boot.mode,
                f" pool {boot.pool}" if boot.mode == "full" else "",
                boot.tftp_port,
                seed_url,
            )
            if on_ready is not None:
                on_ready(info)
            await stop.wait()
            log.info("stopping")
        finally:
            status.unlink(missing_ok=True)
            for service in reversed(started):
                result = service.stop()
                if asyncio.iscoroutine(result):
                    await result
            store.close()
