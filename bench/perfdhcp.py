"""Driving ISC perfdhcp for the DHCP benchmark: runs, reports, and PXE-like clients.

:class:`Bench` runs perfdhcp in the client namespace against one server and
reads its report, with the server's CPU (and everything else's) over the run.

In its own mode perfdhcp (DHCPv4) poses as a relay agent on the segment: hops
1, giaddr = its own address, answers expected unicast to giaddr:67. A PXE ROM
on the provisioning segment sends something else, so the benchmark can also
make perfdhcp send what such a client sends:

- *templates* (``-T``, a documented perfdhcp feature): a DHCPDISCOVER and a
  DHCPREQUEST with hops 0, giaddr 0.0.0.0 and the BROADCAST flag set;
  perfdhcp still fills in the transaction ID, the client MAC (one of ``-R``
  clients, from the ``-b`` base) and, in the REQUEST, the server identifier
  and the requested address from the OFFER. (With templates perfdhcp sends the
  template's giaddr, not its own address.)
- a *broadcast shim* in the client namespace (``python -m bench.perfdhcp shim
  ADDR``): servers answer such clients by broadcast to 255.255.255.255:68,
  which perfdhcp's socket (bound to ADDR:68) does not receive; the shim, bound
  to 255.255.255.255:68, hands each answer to ADDR:68 unchanged.

Both servers get exactly the same packets through the same shim.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from .common import BenchError, bench_env, fmt_s, progress, python
from .netboot import IFACE, Lab, Server, tail
from .netboot import machine_cpu_seconds as machine_cpu

DHCP_OPTIONS_AT = 240  # after the 236-byte BOOTP header and the magic cookie
BASE_MAC = bytes.fromhex("000c02000000")  # perfdhcp's default base is 00:0c:01:02:03:04
XID_OFFSET = 4
MAC_LAST_OFFSET = 28 + len(BASE_MAC) - 1  # -O: the last chaddr byte perfdhcp randomizes


def _template(message_type: int, request: bool) -> tuple[bytes, dict[str, int]]:
    """A BOOTREQUEST from an unconfigured client: hops 0, giaddr 0, BROADCAST flag."""
    header = struct.pack("!BBBBIHH", 1, 1, 6, 0, 0, 0, 0x8000)  # op htype hlen hops xid secs
    header += bytes(16)  # ciaddr yiaddr siaddr giaddr
    header += BASE_MAC + bytes(10) + bytes(64 + 128)  # chaddr, sname, file
    options = bytearray([99, 130, 83, 99, 53, 1, message_type])
    offsets = {}
    if request:
        offsets["server_id"] = len(header) + len(options)  # -S: where option 54 starts
        options += bytes([54, 4, 0, 0, 0, 0])
        offsets["requested_ip"] = len(header) + len(options)  # -I: where option 50 starts
        options += bytes([50, 4, 0, 0, 0, 0])
    options += bytes([55, 4, 1, 3, 6, 15, 255])  # parameter request list; end
    return header + bytes(options), offsets


def template_args(directory: Path) -> list[str]:
    """perfdhcp's arguments for the templates in ``directory`` (and their offsets)."""
    _, offsets = _template(3, request=True)
    return [
        "-T",
        str(directory / "discover.hex"),
        "-T",
        str(directory / "request.hex"),
        "-X",
        str(XID_OFFSET),
        "-O",
        str(MAC_LAST_OFFSET),
        "-E",
        "0",
        "-S",
        str(offsets["server_id"]),
        "-I",
        str(offsets["requested_ip"]),
        "-L",
        "68",
        "-b",  # perfdhcp writes its own MACs over the template's: keep them apart
        f"mac={':'.join(f'{x:02x}' for x in BASE_MAC)}",
    ]


def write_templates(directory: Path) -> list[str]:
    """Write the DISCOVER and REQUEST templates; return perfdhcp's arguments for them."""
    discover, _ = _template(1, request=False)
    req, _ = _template(3, request=True)
    (directory / "discover.hex").write_text(discover.hex())
    (directory / "request.hex").write_text(req.hex())
    return template_args(directory)


# -- the shim ----------------------------------------------------------------------------------


def shim_argv(to_address: str) -> list[str]:
    return [python(), "-m", "bench.perfdhcp", "shim", to_address]


def _shim(to_address: str) -> None:
    """Forward every datagram broadcast to port 68 to ``to_address``:68, until SIGTERM."""
    inbound = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    inbound.bind(("255.255.255.255", 68))  # receives broadcasts to :68, nothing else
    outbound = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    target = (to_address, 68)
    forwarded = 0

    def stop(*_args) -> None:
        print(forwarded, flush=True)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    print("ready", flush=True)
    while True:
        outbound.sendto(inbound.recv(4096), target)
        forwarded += 1


# -- running perfdhcp and reading its report ------------------------------------------------------


@dataclasses.dataclass
class Exchange:
    sent: int = 0
    received: int = 0
    drops: int = 0
    avg_delay_ms: float = 0.0


_STAT_KEYS = {
    "sent packets": "sent",
    "received packets": "received",
    "drops": "drops",
    "avg delay": "avg_delay_ms",
}


@dataclasses.dataclass
class Report:
    exchanges: dict[str, Exchange]
    took: float | None  # the avalanche: seconds to provision every client
    resent: int


def parse(text: str) -> Report:
    """perfdhcp's final report: per exchange statistics, the avalanche time, resends."""
    stats: dict[str, Exchange] = {}
    current: Exchange | None = None
    for line in text.splitlines():
        if m := re.match(r"\*\*\*Statistics for: (\S+)\*\*\*", line):
            current = stats.setdefault(m.group(1), Exchange())
            continue
        key, sep, value = line.partition(":")
        if current is not None and sep and key.strip() in _STAT_KEYS:
            if number := re.match(r"\s*([\d.]+)", value):
                field = _STAT_KEYS[key.strip()]
                cast = float if field == "avg_delay_ms" else int
                setattr(current, field, cast(float(number.group(1))))
    took = None
    if m := re.search(r"It took (\d+):(\d+):([\d.]+) to provision (\d+) clients", text):
        took = int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3))
    resent = int(m.group(1)) if (m := re.search(r"Requests resent: (\d+)", text)) else 0
    return Report(stats, took, resent)


@dataclasses.dataclass
class Run:
    stdout: str
    returncode: int
    wall: float
    cpu: float
    interrupted: bool  # stopped with SIGINT at the deadline


def run_perfdhcp(argv: Sequence[str], deadline: float) -> Run:
    """Run perfdhcp; at ``deadline`` seconds SIGINT it (it then prints its report).

    The avalanche retries until every client is leased, so a server that stops
    answering would keep it running for ever. SIGKILL 15 s after the SIGINT.
    """
    with tempfile.TemporaryFile("w+") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            env=bench_env(),
        )  # fmt: skip
        interrupted = threading.Event()

        def interrupt() -> None:
            interrupted.set()
            proc.send_signal(signal.SIGINT)

        soft = threading.Timer(deadline, interrupt)
        hard = threading.Timer(deadline + 15, proc.kill)
        soft.start()
        hard.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            soft.cancel()
            hard.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - started
        out.seek(0)
        text = out.read()
    if proc.returncode not in (0, 3) and not interrupted.is_set():  # 3: some not completed
        raise BenchError(f"perfdhcp exited {proc.returncode}: {text[-800:]}")
    return Run(text, proc.returncode, wall, usage.ru_utime + usage.ru_stime, interrupted.is_set())


# -- perfdhcp against a running server -------------------------------------------------------

WAIT_US = 1_000_000  # perfdhcp -W: after the last request, wait 1 s for late answers
AVALANCHE_DEADLINE = 60.0  # the avalanche retries for ever if a server stops answering


@dataclasses.dataclass
class Perf:
    """One perfdhcp run: its report, its own CPU, the server's and the shim's over the run."""

    rate: int | None  # offered exchanges/s; None for the avalanche
    seconds: float  # -p (sending time); the avalanche's provisioning time
    report: Report
    perf_cpu: float
    server_cpu: float
    shim_cpu: float
    others_cpu: float  # other processes on the machine over the run
    wall: float
    interrupted: bool = False

    @property
    def do(self) -> Exchange:
        return self.report.exchanges.get("DISCOVER-OFFER", Exchange())

    @property
    def ra(self) -> Exchange:
        return self.report.exchanges.get("REQUEST-ACK", Exchange())

    @property
    def drops(self) -> int:
        return self.do.drops + self.ra.drops

    @property
    def leases_per_s(self) -> float:
        return self.ra.received / self.seconds if self.seconds else 0.0

    @property
    def sent_share(self) -> float:
        """DISCOVERs perfdhcp sent, as a share of what it was asked to offer."""
        return 1.0 if self.rate is None else self.do.sent / (self.rate * self.seconds)

    def line(self) -> str:
        what = f"rate {self.rate}/s" if self.rate else "avalanche"
        return (
            f"{what}: {self.ra.received} ACKs, {self.leases_per_s:.0f} leases/s, drops "
            f"{self.do.drops}+{self.ra.drops}, sent {self.sent_share * 100:.0f}% of offered, "
            f"server CPU {self.server_cpu:.2f} s, perfdhcp CPU {self.perf_cpu:.2f} s"
        )


class Bench:
    """perfdhcp against one running server (through the broadcast shim, in direct mode)."""

    def __init__(
        self,
        lab: Lab,
        server: Server,
        clients: int,
        shim: Server | None = None,
        templates: Sequence[str] = (),
    ) -> None:
        self.lab, self.server, self.clients = lab, server, clients
        self.shim, self.templates = shim, list(templates)

    def _shim_cpu(self) -> float:
        return self.shim.cpu_seconds() if self.shim is not None else 0.0

    def perf(self, args: list[str], rate: int | None, seconds: float) -> Perf:
        argv = [*self.lab.client.prefix, "perfdhcp", "-4", "-l", IFACE, "-R", str(self.clients)]
        argv += ["-W", str(WAIT_US), *self.templates, *args]
        deadline = AVALANCHE_DEADLINE if rate is None else seconds + 30
        server0, shim0, machine0 = self.server.cpu_seconds(), self._shim_cpu(), machine_cpu()
        run = run_perfdhcp(argv, deadline)
        server_cpu = self.server.cpu_seconds() - server0
        shim_cpu = self._shim_cpu() - shim0
        others = machine_cpu() - machine0 - server_cpu - shim_cpu - run.cpu
        report = parse(run.stdout)
        if "DISCOVER-OFFER" not in report.exchanges:
            raise BenchError(f"perfdhcp printed no statistics: {run.stdout[-800:]}")
        if rate is None:
            seconds = report.took if report.took is not None else run.wall
        return Perf(
            rate,
            seconds,
            report,
            run.cpu,
            server_cpu,
            shim_cpu,
            max(0.0, others),
            run.wall,
            run.interrupted,
        )

    def avalanche(self, what: str) -> Perf:
        aval = self.perf(["--scenario", "avalanche"], None, 0.0)
        progress(
            f"    {what} avalanche: {aval.line()}, took {fmt_s(aval.seconds)}, "
            f"resent {aval.report.resent}"
        )
        if aval.ra.received < self.clients or aval.interrupted:
            hint = ""
            if not aval.do.received and not self.templates:
                hint = (
                    " (perfdhcp poses as a relay agent: giaddr = its address, answers "
                    "expected unicast to giaddr:67)"
                )
            raise BenchError(
                f"{self.server.label}: {aval.ra.received} of {self.clients} clients leased in the "
                f"{what} avalanche within {AVALANCHE_DEADLINE:.0f} s (offers "
                f"{aval.do.received}){hint}; {tail(self.server.log, 400)}"
            )
        return aval

    def step(self, rate: int, seconds: int) -> Perf:
        args = ["-r", str(rate), "-p", str(seconds)]
        run = self.perf(args, rate, seconds)
        progress(f"    {run.line()}")
        if run.drops:
            retry = self.perf(args, rate, seconds)
            progress(f"    retry: {retry.line()}")
            run = retry if retry.drops < run.drops else run
        return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.perfdhcp")
    sub = parser.add_subparsers(dest="helper", required=True)
    shim = sub.add_parser("shim", help="forward broadcasts to port 68 to ADDR:68")
    shim.add_argument("address")
    args = parser.parse_args(argv)
    if args.helper == "shim":
        _shim(args.address)


if __name__ == "__main__":
    main()
