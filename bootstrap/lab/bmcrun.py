"""Many simulated BMCs in one process: specs, the event loop, the manifest.

``BmcSimulator`` binds one UDP endpoint per BMC and drives pyghmi's event loop
on the calling thread, with a timer heap for injected latency and delayed
power changes. When every endpoint is bound it writes a manifest (JSON, no
passwords) so a caller knows the simulator is ready and what it serves.

The loop is our own (epoll through ``selectors``), not pyghmi's IO thread, so
BMCs that share a port never see each other's sessions and there is no
select() limit on how many BMCs one process serves.
"""

from __future__ import annotations

import dataclasses
import heapq
import ipaddress
import itertools
import json
import logging
import os
import random
import resource
import selectors
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .bmcsim import Faults, Machine, PowerHook, SimBmc, UserTable

log = logging.getLogger(__name__)

#: UUIDs of lab machines are derived from their BMC endpoint under this namespace.
LAB_NAMESPACE = uuid.UUID("7b0c1e4a-6d6b-4f0e-9a53-6d6574616c73")


@dataclasses.dataclass
class BmcSpec:
    address: str
    port: int = 623
    guid: str | None = None
    mac: str | None = None
    power: str = "off"
    users: list[tuple[str, str]] | None = None
    faults: Faults = dataclasses.field(default_factory=Faults)
    manufacturer_id: int = 0xA0A0
    product_id: int = 0x0001
    firmware: tuple[int, int] = (1, 2)
    fru: dict[str, str] | None = None

    @property
    def endpoint(self) -> str:
        return f"{self.address}:{self.port}"

    def resolved_guid(self) -> uuid.UUID:
        return uuid.UUID(self.guid) if self.guid else uuid.uuid5(LAB_NAMESPACE, self.endpoint)

    def resolved_mac(self) -> str:
        if self.mac:
            return self.mac.lower()
        raw = self.resolved_guid().bytes
        # locally administered, unicast: 02:xx:...
        return ":".join(f"{b:02x}" for b in (0x02, *raw[-5:]))

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> BmcSpec:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(obj) - fields
        if unknown:
            raise UsageError(f"unknown BMC spec keys: {', '.join(sorted(unknown))}")
        if "address" not in obj:
            raise UsageError("a BMC spec needs an address")
        data = dict(obj)
        if "faults" in data:
            data["faults"] = Faults(**data["faults"])
        if data.get("users") is not None:
            data["users"] = [tuple(u) for u in data["users"]]
        if "firmware" in data:
            data["firmware"] = tuple(data["firmware"])
        return cls(**data)


def generate_specs(
    count: int, start: str, port: int = 623, vary: str = "address", **common: Any
) -> list[BmcSpec]:
    """``count`` BMCs from ``start``: consecutive addresses, or consecutive ports on one."""
    if count < 1:
        raise UsageError("--count must be at least 1")
    try:
        first = ipaddress.ip_address(start)
    except ValueError:
        raise UsageError(f"{start!r} is not an IP address") from None
    specs = []
    faults = common.pop("faults", None)
    for i in range(count):
        if faults is not None:  # each BMC counts its own faults (refused sessions)
            common["faults"] = dataclasses.replace(faults)
        if vary == "address":
            specs.append(BmcSpec(address=str(first + i), port=port, **common))
        elif vary == "port":
            if port + i > 65535:
                raise UsageError("ports run past 65535")
            specs.append(BmcSpec(address=str(first), port=port + i, **common))
        else:
            raise UsageError("vary must be 'address' or 'port'")
    for n, spec in enumerate(specs):
        spec.fru = spec.fru or {
            "manufacturer": "metalseed lab",
            "product": "SimServer 1U",
            "serial": f"LAB{spec.resolved_guid().hex[:10].upper()}",
            "asset_tag": f"rack1-u{n + 1}",
        }
    return specs


def command_power_hook(argv: Sequence[str]) -> PowerHook:
    """A power hook that runs ``argv`` with the BMC and the new state in its environment."""
    children: list[subprocess.Popen] = []

    def hook(bmc: SimBmc, state: str) -> None:
        children[:] = [c for c in children if c.poll() is None]  # reap finished ones
        env = dict(
            os.environ,
            METALSEED_POWER=state,
            METALSEED_BMC_ADDRESS=bmc.address,
            METALSEED_BMC_PORT=str(bmc.port),
            METALSEED_BMC_GUID=str(bmc.uuid),
            METALSEED_BMC_MAC=bmc.mac,
        )
        try:
            children.append(subprocess.Popen(list(argv), env=env, stdin=subprocess.DEVNULL))
        except OSError as exc:
            log.error("power hook %s failed to start: %s", argv[0], exc)

    return hook


class BmcSimulator:
    def __init__(
        self,
        specs: Sequence[BmcSpec],
        default_users: Sequence[tuple[str, str]] = (),
        power_hook: PowerHook | None = None,
        seed: int | None = None,
    ) -> None:
        self.specs = list(specs)
        self.default_users = list(default_users)
        self.power_hook = power_hook
        self.bmcs: list[SimBmc] = []
        self._timers: list[tuple[float, int, Callable, tuple, dict]] = []
        self._seq = itertools.count()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._selector: selectors.BaseSelector | None = None

    def _defer(self, delay: float, fn: Callable, *args: Any, **kwargs: Any) -> None:
        if delay <= 0:
            fn(*args, **kwargs)
            return
        with self._lock:
            heapq.heappush(
                self._timers, (time.monotonic() + delay, next(self._seq), fn, args, kwargs)
            )

    def start(self) -> None:
        """Bind every endpoint. Raises ``UsageError`` naming the one that failed."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        seen = set()
        for spec in self.specs:
            if spec.endpoint in seen:
                raise UsageError(f"two BMCs on {spec.endpoint}")
            seen.add(spec.endpoint)
            users = spec.users if spec.users is not None else self.default_users
            if not users:
                raise UsageError(f"BMC {spec.endpoint} has no users; give --credentials")
            try:
                bmc = SimBmc(
                    address=spec.address,
                    port=spec.port,
                    guid=spec.resolved_guid(),
                    mac=spec.resolved_mac(),
                    users=UserTable(list(users)),
                    defer=self._defer,
                    machine=Machine(power=spec.power),
                    faults=dataclasses.replace(spec.faults),
                    manufacturer_id=spec.manufacturer_id,
                    product_id=spec.product_id,
                    firmware=spec.firmware,
                    fru=spec.fru,
                    power_hook=self._on_power,
                    rng=random.Random(self._rng.random()),
                )
            except OSError as exc:
                raise UsageError(f"cannot bind BMC {spec.endpoint}: {exc.strerror}") from None
            self.bmcs.append(bmc)

    def _on_power(self, bmc: SimBmc, state: str) -> None:
        log.info("bmc %s:%s machine %s power %s", bmc.address, bmc.port, bmc.uuid, state)
        if self.power_hook is not None:
            try:
                self.power_hook(bmc, state)
            except Exception:  # a broken hook must not take the BMCs down
                log.exception("power hook failed for %s:%s", bmc.address, bmc.port)

    def manifest(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "bmcs": [
                {
                    "bmc": f"{b.address}:{b.port}",
                    "address": b.address,
                    "port": b.port,
                    "guid": str(b.uuid),
                    "mac": b.mac,
                    "power": b.machine.power,
                }
                for b in self.bmcs
            ],
        }

    def write_manifest(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.manifest(), indent=2) + "\n")
        os.replace(tmp, path)

    def run_once(self, max_wait: float = 0.2) -> None:
        """One turn of the loop: due timers, then up to ``max_wait`` of network I/O."""
        if self._selector is None:
            self._selector = selectors.DefaultSelector()
            for bmc in self.bmcs:
                self._selector.register(bmc.serversocket, selectors.EVENT_READ, bmc)
        now = time.monotonic()
        due = []
        with self._lock:
            while self._timers and self._timers[0][0] <= now:
                due.append(heapq.heappop(self._timers))
            wait = max_wait if not self._timers else min(max_wait, self._timers[0][0] - now)
        for _, _, fn, args, kwargs in due:
            try:
                fn(*args, **kwargs)
            except Exception:
                log.exception("simulated BMC failed handling a packet")
        for key, _ in self._selector.select(max(wait, 0.0)):
            bmc, sock = key.data, key.fileobj
            for _ in range(256):  # drain, but let the other BMCs have a turn
                try:
                    data, sockaddr = sock.recvfrom(4096, socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:  # e.g. ICMP errors surfacing on the socket
                    log.debug("bmc %s:%s socket error: %s", bmc.address, bmc.port, exc)
                    continue
                try:
                    bmc.datagram(data, sockaddr)
                except Exception:  # malformed input must not stop the other BMCs
                    log.exception("bmc %s:%s failed handling a packet", bmc.address, bmc.port)

    def close(self) -> None:
        if self._selector is not None:
            self._selector.close()
            self._selector = None
        for bmc in self.bmcs:
            bmc.close()

    def run(self, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                self.run_once()
        finally:
            self.close()
