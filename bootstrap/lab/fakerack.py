"""Many fake machines in one process: the ``Rack``, its control socket, the enlist.

``Rack`` runs each powered-on fake machine's boot (``firmware.Firmware``) in
a thread, with one raw DHCP socket per interface shared by all of them
(``firmware_dhcp.DhcpPort``): 1,000 machines are 1,000 mostly idle threads in
one process, not 1,000 processes with scapy loaded (~55 MB each). Where a
real machine would start its kernel, a fake enlists (``enlist_hook``): it
POSTs what the node agent would -- ``{"mac", "node", "boot_id",
"inventory"}`` with the token from the kernel command line -- from its
leased address, through the agent's own client
(``bootstrap.agent.client.post_json``), and then stays on.

``serve_rack`` answers power requests on a Unix socket (one JSON line each
way): ``{"power": "on"|"off"|"reset", "name": N}``, ``{"status": true}``,
``{"stop": true}``. ``python -m bootstrap.lab.fakemachine rack`` runs it; the
power hook in ``fakemachine`` talks to it.
"""

from __future__ import annotations

import dataclasses
import http.client
import itertools
import json
import logging
import os
import socketserver
import threading
import time
import urllib.parse
import urllib.request
import uuid as uuidlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..agent.client import MAX_ANSWER, EnlistFailed, post_json
from ..agent.cmdline import CmdlineError, parse_boot_params
from .fakemachine import FakeError, FakeSpec, fake_inventory, short_path
from .firmware import BootContext, Firmware, FirmwareResult, Options
from .firmware_dhcp import Cancelled, DhcpPort

log = logging.getLogger(__name__)


def bound_send(source_ip: str):
    """The agent client's ``send``, from ``source_ip`` (the fake's leased address)."""

    def send(request: urllib.request.Request, timeout: float) -> tuple[int, bytes]:
        parts = urllib.parse.urlsplit(request.full_url)
        conn = http.client.HTTPConnection(
            parts.hostname or "", parts.port or 80, timeout=timeout, source_address=(source_ip, 0)
        )
        try:
            target = parts.path + (f"?{parts.query}" if parts.query else "")
            conn.request(request.get_method(), target, request.data, dict(request.header_items()))
            response = conn.getresponse()
            return response.status, response.read(MAX_ANSWER + 1)
        finally:
            conn.close()

    return send


def enlist_hook(
    disks: int | None = None,
    *,
    attempts: int = 6,
    backoff: float = 1.0,
    cancel: threading.Event | None = None,
):
    """The fake kind's "boot": enlist like the agent, record the answer, stay on."""
    stop = cancel or threading.Event()

    def sleep(seconds: float) -> None:
        if stop.wait(seconds):
            raise Cancelled()

    def boot(ctx: BootContext) -> None:
        report = ctx.result.boot
        try:
            params = parse_boot_params(ctx.cmdline)
        except CmdlineError as exc:
            report.update(enlisted=False, error=str(exc))
            return
        body = {
            "mac": params.mac,
            "node": params.node,
            "boot_id": str(uuidlib.uuid4()),
            "inventory": fake_inventory(ctx.firmware.uuid, params.mac, disks),
        }
        started = time.monotonic()
        try:
            answer = post_json(
                params.enlist_url,
                params.token,
                body,
                attempts=attempts,
                backoff=backoff,
                send=bound_send(ctx.source_ip),
                sleep=sleep,
            )
        except EnlistFailed as exc:
            report.update(enlisted=False, error=str(exc), status=exc.status)
            log.warning("%s: enlist failed: %s", params.mac, exc)
            return
        report.update(
            enlisted=True,
            node=answer.get("node"),
            state=answer.get("state"),
            boot_id=body["boot_id"],
            seconds=round(time.monotonic() - started, 4),
        )

    return boot


# -- many machines in one process ----------------------------------------------------------------


class _Running:
    def __init__(self) -> None:
        self.cancel = threading.Event()
        self.firmware: Firmware | None = None
        self.thread: threading.Thread | None = None


class Rack:
    """Fake machines of this namespace: ``power(name, "on"|"off"|"reset")``, ``wait``.

    A failed network boot reboots the machine after ``reboot_delay`` seconds, as a
    PC set to boot from the network does, up to ``max_boots`` boots (None: forever).
    """

    def __init__(
        self,
        specs: Sequence[FakeSpec],
        *,
        options: Options | None = None,
        results_dir: Path | None = None,
        enlist: bool = True,
        reboot_delay: float = 5.0,
        max_boots: int | None = None,
    ) -> None:
        self.specs = {s.name: s for s in specs}
        self.options = options or Options()
        self.results_dir = results_dir
        self.enlist = enlist
        self.reboot_delay = reboot_delay
        self.max_boots = max_boots
        self.results: dict[str, FirmwareResult] = {}
        self._ports: dict[str, DhcpPort] = {}
        self._running: dict[str, _Running] = {}
        self._lock = threading.Lock()

    def _port(self, interface: str) -> DhcpPort:
        if interface not in self._ports:
            self._ports[interface] = DhcpPort(interface).open()
        return self._ports[interface]

    def power(self, name: str, state: str) -> None:
        if name not in self.specs:
            raise FakeError(f"no fake machine {name!r}")
        if state in ("off", "reset"):
            self._off(name)
        if state in ("on", "reset"):
            self._on(name)
        elif state != "off":
            raise FakeError(f"unknown power state {state!r}")

    def is_on(self, name: str) -> bool:
        return name in self._running

    def status(self, name: str) -> dict[str, Any]:
        result = self.results.get(name)
        lease = result.lease if result else None
        return {
            "power": "on" if self.is_on(name) else "off",
            "outcome": result.outcome if result else None,
            "attempt": result.attempt if result else 0,
            "ip": lease.ip if lease else None,
            "enlisted": bool(result and result.boot.get("enlisted")),
            "node": result.boot.get("node") if result else None,
        }

    def _on(self, name: str) -> None:
        with self._lock:
            if name in self._running:
                return
            running = self._running[name] = _Running()
            port = self._port(self.specs[name].interface)
            running.thread = threading.Thread(target=self._boot, args=(name, port, running))
            running.thread.start()

    def _boot(self, name: str, port: DhcpPort, running: _Running) -> None:
        spec = self.specs[name]
        hook = enlist_hook(spec.disks, cancel=running.cancel) if self.enlist else None
        options = dataclasses.replace(self.options, arch=spec.arch)
        for attempt in itertools.count(1):
            if running.firmware is not None:  # a reboot: the old address goes
                running.firmware.release()
            firmware = Firmware(
                port, spec.mac, spec.uuid, options=options, on_boot=hook, cancel=running.cancel
            )
            running.firmware = firmware
            try:
                result = firmware.run()
            except Exception as exc:  # a bug in one machine must not go unseen or stop others
                log.exception("%s: the emulated firmware crashed", name)
                result = firmware.result
                result.outcome, result.error = "failed", f"{type(exc).__name__}: {exc}"
            result.attempt = attempt
            self.results[name] = result
            self._write(name, result)
            log.info("%s: %s in %.2f s (boot %d)", name, result.outcome, result.total, attempt)
            if result.outcome != "failed" or attempt == self.max_boots:
                return
            if running.cancel.wait(self.reboot_delay):
                return

    def _write(self, name: str, result: FirmwareResult) -> None:
        if self.results_dir is None:
            return
        self.results_dir.mkdir(parents=True, exist_ok=True)
        path = self.results_dir / f"{name}.result.json"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(result.to_json(), indent=2) + "\n")
        os.replace(tmp, path)

    def _off(self, name: str) -> None:
        with self._lock:
            running = self._running.pop(name, None)
        if running is None:
            return
        running.cancel.set()
        if running.thread is not None:
            running.thread.join(30)
        if running.firmware is not None:
            running.firmware.release()

    def wait(self, names: Sequence[str] | None = None, timeout: float | None = None) -> bool:
        """Wait until the named machines' boots are over; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for name in names or list(self._running):
            running = self._running.get(name)
            if running is not None and running.thread is not None:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                running.thread.join(left)
                if running.thread.is_alive():
                    return False
        return True

    def close(self) -> None:
        for name in list(self._running):
            self._off(name)
        for port in self._ports.values():
            port.close()
        self._ports.clear()


# -- the control socket ------------------------------------------------------------------------


def serve_rack(rack: Rack, path: Path, stop: threading.Event) -> None:
    """Answer power, status and stop requests on the Unix socket ``path`` until ``stop``."""

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            try:
                request = json.loads(self.rfile.readline())
                answer: dict[str, Any] = {"ok": True}
                if "power" in request:
                    rack.power(request["name"], request["power"])
                elif request.get("stop"):
                    stop.set()
                else:
                    answer["machines"] = {name: rack.status(name) for name in rack.specs}
            except (ValueError, KeyError, TypeError, FakeError, OSError) as exc:
                answer = {"ok": False, "error": str(exc)}
            self.wfile.write(json.dumps(answer).encode() + b"\n")

    path.unlink(missing_ok=True)
    with short_path(path) as address:
        server = socketserver.ThreadingUnixStreamServer(address, Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.2,), daemon=True)
    thread.start()
    log.info("fake rack: %d machines, control socket %s", len(rack.specs), path)
    try:
        stop.wait()
    finally:
        server.shutdown()
        server.server_close()
        path.unlink(missing_ok=True)
