"""The fake machine kind: the real network boot, then an enlist with a made-up inventory.

A fake machine is a MAC and an SMBIOS UUID on an interface it shares with
other fakes. Powered on, it runs the firmware emulator (``firmware``: DHCP
as PXE, TFTP, DHCP as iPXE, HTTP, the iPXE script, verified downloads) and,
where a real machine would start the kernel, enlists with the inventory
``fake_inventory`` makes up from its UUID (the same UUID is always the same
machine: CPUs, memory, empty disks, its NIC), as the node agent would. Then
nothing: it stays on. The boots run in a ``fakerack.Rack``, one process per
namespace for all of its fakes.

Machines are listed in a *machines file*, as QEMU machines are
(``qemu.write_machines``): the state directory and, per machine, its name,
UUID, MAC, interface and namespace (``write_machines``). The BMC simulator's
power hook is ``python -m bootstrap.lab.fakemachine hook --machines FILE``
(``METALSEED_POWER``, ``METALSEED_BMC_GUID`` in its environment, as
``hook_command(FILE)`` gives it): it asks the rack of the machine's namespace
(control socket ``STATE/rack-NS.sock``) to switch the machine, starting that
rack first if none runs (``ip netns exec NS python -m
bootstrap.lab.fakemachine rack --machines FILE --netns NS``, its PID in
``STATE/rack-NS.pid``, its log in ``STATE/rack-NS.log``). Every boot's result,
token masked, is in ``STATE/NAME.result.json``. ``boot`` boots machines at once
in this process and prints their results (tests, benchmarks); ``status`` and
``stop`` talk to a running rack.

This module stays light (no scapy, no threads) because the BMC simulator
starts a hook process for every power change: 1,000 at once in a storm.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid as uuidlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from . import machinesfile

log = logging.getLogger(__name__)

CPU_MODELS = (
    "Intel(R) Xeon(R) Silver 4314 CPU @ 2.40GHz",
    "Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz",
    "AMD EPYC 7313P 16-Core Processor",
)
DISK_SIZES = (480, 960, 1920, 3840)  # GB, as vendors count
RACK_START_TIMEOUT = 20.0


class FakeError(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class FakeSpec:
    name: str
    uuid: str  # SMBIOS system UUID == its BMC's system GUID
    mac: str
    interface: str  # shared by every fake in the namespace
    netns: str | None = None
    arch: int = 0
    disks: int | None = None  # empty data disks; None: 1-4, from the UUID

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> FakeSpec:
        return cls(**{f.name: obj[f.name] for f in dataclasses.fields(cls) if f.name in obj})

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- the inventory and the enlist -------------------------------------------------------------


def fake_inventory(uuid: str, mac: str, disks: int | None = None) -> dict[str, Any]:
    """The inventory the agent would send, made up from the UUID (same UUID, same machine)."""
    rng = random.Random(uuidlib.UUID(uuid).int)
    tag = uuidlib.UUID(uuid).hex[:12].upper()
    count = disks if disks is not None else rng.randint(1, 4)
    return {
        "system": {
            "uuid": str(uuidlib.UUID(uuid)),
            "serial": f"FAKE-{tag}",
            "vendor": "metalseed lab",
            "product": "fake machine",
        },
        "cpus": {"count": rng.choice((4, 8, 16, 32, 64)), "model": rng.choice(CPU_MODELS)},
        "memory": {"bytes": rng.choice((16, 32, 64, 128, 256)) * 2**30},
        "disks": [
            {
                "name": f"sd{chr(ord('a') + i)}",
                "size_bytes": rng.choice(DISK_SIZES) * 10**9,
                "rotational": False,
                "removable": False,
                "serial": f"FAKE{tag}{i:02d}",
                "wwn": f"0x5000c500{rng.getrandbits(32):08x}",
                "model": "metalseed fake disk",
                "partitions": 0,
                "holders": [],
                "signature": None,
                "empty": True,
            }
            for i in range(count)
        ],
        "nics": [
            {
                "name": "eth0",
                "mac": mac.lower(),
                "driver": "fake",
                "link": "up",
                "speed_mbps": 10000,
                "mtu": 1500,
            }
        ],
        "lldp": [],
    }


# -- machines files, racks, the power hook ----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Machines:
    state_dir: Path
    specs: tuple[FakeSpec, ...]

    def by_guid(self, guid: str) -> FakeSpec | None:
        want = uuidlib.UUID(guid)
        return next((s for s in self.specs if uuidlib.UUID(s.uuid) == want), None)

    def in_netns(self, netns: str | None) -> tuple[FakeSpec, ...]:
        return tuple(s for s in self.specs if s.netns == netns)

    def control(self, netns: str | None) -> Path:
        return self.state_dir / f"rack-{netns or 'default'}.sock"


def write_machines(path: Path, state_dir: Path, specs: Sequence[FakeSpec]) -> Path:
    return machinesfile.write(path, state_dir, specs)


def read_machines(path: Path) -> Machines:
    return Machines(*machinesfile.read(path, FakeSpec.from_json, FakeError))


@contextlib.contextmanager
def short_path(path: Path) -> Iterator[str]:
    """``path`` as ``/proc/self/fd/N/NAME``: Unix socket addresses are limited to 107 bytes."""
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def _ask(path: Path, request: dict[str, Any], timeout: float = 60.0) -> dict[str, Any] | None:
    """One request to a rack's control socket; None when no rack listens there."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            with short_path(path) as address:
                sock.connect(address)
            sock.sendall(json.dumps(request).encode() + b"\n")
            answer = sock.makefile("rb").readline()
    except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
        return None
    return json.loads(answer) if answer else {"ok": False, "error": "no answer"}


def rack_status(machines: Machines, netns: str | None) -> dict[str, dict] | None:
    """Each machine of the rack of ``netns``: power, outcome, boot, ip, enlisted, node.

    None when no rack runs there (every machine is off)."""
    answer = _ask(machines.control(netns), {"status": True})
    return answer.get("machines") if answer else None


def rack_argv(machines_file: Path, netns: str | None) -> list[str]:
    argv = [sys.executable, "-m", "bootstrap.lab.fakemachine", "rack"]
    argv += ["--machines", str(machines_file)] + (["--netns", netns] if netns else [])
    return ["ip", "netns", "exec", netns, *argv] if netns else argv  # execs: the same PID


def ensure_rack(machines_file: Path, machines: Machines, netns: str | None) -> None:
    """Start the rack of ``netns`` unless one answers (one at a time: a lock file)."""
    state = machines.state_dir
    state.mkdir(parents=True, exist_ok=True)
    name = f"rack-{netns or 'default'}"
    with (state / f"{name}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _ask(machines.control(netns), {"status": True}) is not None:
            return
        with (state / f"{name}.log").open("a") as out:
            proc = subprocess.Popen(
                rack_argv(machines_file, netns),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        (state / f"{name}.pid").write_text(f"{proc.pid}\n")
        deadline = time.monotonic() + RACK_START_TIMEOUT
        while _ask(machines.control(netns), {"status": True}) is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise FakeError(f"the fake rack for {netns} did not start; see {out.name}")
            time.sleep(0.05)


def rack_pid(machines: Machines, netns: str | None) -> int | None:
    """The PID of the rack of ``netns``, checked to be a fake rack of this state directory."""
    try:
        pid = int((machines.state_dir / f"rack-{netns or 'default'}.pid").read_text())
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    return pid if b"bootstrap.lab.fakemachine" in argv and b"rack" in argv else None


def stop_rack(machines: Machines, netns: str | None, grace: float = 30.0) -> bool:
    """Stop the rack of ``netns`` (its machines power off); False if none ran."""
    pid = rack_pid(machines, netns)
    answer = _ask(machines.control(netns), {"stop": True})
    if answer is None and pid is None:
        return False
    if pid is not None:
        if answer is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.05)
    return True


def hook_argv(machines_file: Path) -> list[str]:
    """The command for ``metalseed lab bmc --power-hook`` (``shlex.join`` it)."""
    return [
        sys.executable,
        "-m",
        "bootstrap.lab.fakemachine",
        "hook",
        "--machines",
        str(machines_file),
    ]


def hook_command(machines_file: Path) -> str:
    return shlex.join(hook_argv(machines_file))


def power(machines_file: Path, guid: str, state: str) -> str | None:
    """Switch the fake machine whose UUID is ``guid``; its name (None: no such machine)."""
    machines = read_machines(machines_file)
    spec = machines.by_guid(guid)
    if spec is None:
        log.warning("no fake machine for BMC GUID %s in %s", guid, machines_file)
        return None
    if state != "off":
        ensure_rack(machines_file, machines, spec.netns)
    answer = _ask(machines.control(spec.netns), {"power": state, "name": spec.name})
    if answer is not None and not answer.get("ok"):
        raise FakeError(f"the fake rack refused {state} for {spec.name}: {answer.get('error')}")
    return spec.name


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bootstrap.lab.fakemachine", description="Fake lab machines."
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    boot = sub.add_parser("boot", help="boot machines here, now, at once; print JSON results")
    boot.add_argument("names", nargs="*", help="machine names (default: all)")
    boot.add_argument("--no-enlist", action="store_true")
    boot.add_argument("--sleep-scale", type=float, default=1.0)
    boot.add_argument("--boots", type=int, default=3, help="boots per machine at most")
    rack = sub.add_parser("rack", help="serve the machines of --netns (run it there)")
    rack.add_argument("--netns", default=None)
    for cmd in ("boot", "rack"):
        sub.choices[cmd].add_argument("--no-rootfs", action="store_true")
    sub.add_parser("hook", help="a BMC power hook: METALSEED_POWER, METALSEED_BMC_GUID")
    for cmd in ("status", "stop"):
        sub.add_parser(cmd, help=f"{cmd} the running racks").add_argument("--netns", default=None)
    for p in sub.choices.values():
        p.add_argument("--machines", type=Path, required=True, help="machines file (JSON)")
        p.add_argument("--verbose", "-v", action="store_true")
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="fake: %(message)s", stream=sys.stderr)
    try:
        machines = read_machines(args.machines)
        if args.cmd == "hook":
            state, guid = os.environ.get("METALSEED_POWER"), os.environ.get("METALSEED_BMC_GUID")
            if not state or not guid:
                raise FakeError("hook: METALSEED_POWER and METALSEED_BMC_GUID must be set")
            power(args.machines, guid, state)
            return 0
        if args.cmd in ("status", "stop"):
            namespaces = (
                [args.netns] if args.netns else sorted({s.netns or "" for s in machines.specs})
            )
            for ns in namespaces:
                if args.cmd == "stop":
                    stopped = stop_rack(machines, ns or None)
                    print(f"{ns or 'default'}: {'stopped' if stopped else 'not running'}")
                else:
                    print(json.dumps({ns or "default": rack_status(machines, ns or None)}))
            return 0
        return _run(args, machines)
    except (FakeError, OSError) as exc:
        log.error("%s", exc)
        return 1


def _run(args: argparse.Namespace, machines: Machines) -> int:
    from .fakerack import Rack, serve_rack  # scapy and threads: only where machines run
    from .firmware import Options

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    options = Options(fetch_rootfs=not args.no_rootfs)
    if args.cmd == "rack":
        rack = Rack(machines.in_netns(args.netns), options=options, results_dir=machines.state_dir)
        try:
            serve_rack(rack, machines.control(args.netns), stop)
        finally:
            rack.close()
        return 0
    specs = [s for s in machines.specs if not args.names or s.name in args.names]
    if args.names and len(specs) != len(set(args.names)):
        raise FakeError(f"unknown machine among {', '.join(args.names)}")
    rack = Rack(
        specs,
        options=dataclasses.replace(options, sleep_scale=args.sleep_scale),
        results_dir=machines.state_dir,
        enlist=not args.no_enlist,
        max_boots=args.boots,
    )
    try:
        for spec in specs:
            rack.power(spec.name, "on")
        rack.wait()
        results = {name: result.to_json() for name, result in rack.results.items()}
    finally:
        rack.close()
    print(json.dumps(results, indent=2), flush=True)
    return 0 if all(r["outcome"] == "booted" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
