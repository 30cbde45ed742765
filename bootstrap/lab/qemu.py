"""QEMU machines for the lab: real PC firmware and a real iPXE NIC ROM, powered by a BMC.

A ``VmSpec`` describes one machine: its SMBIOS UUID (the same as its BMC's
system GUID, so firmware, iPXE and DMI all report it), its NIC's MAC, the tap
it is wired to and the network namespace that owns that tap (QEMU must run
there), memory and optional virtio data disks (sparse files kept across power
cycles). It boots from the network only (``-boot n``), with SeaBIOS and the
``ipxe-qemu`` ROM of a virtio-net NIC, and writes firmware and console output
to ``STATE/NAME.serial.log``.

A running machine is tracked by ``STATE/NAME.pid`` and stopped by that PID
only, after checking the PID still belongs to it. ``on``/``off`` are
serialised per machine with a lock file, because a BMC's power hook runs each
change as its own process.

KVM is used only when it really works here (the CPU flags and a VM can be
created); otherwise TCG.

Machines are listed in a *machines file* (JSON, see ``write_machines``); the
BMC simulator's command hook runs ``python -m bootstrap.lab.qemu hook
--machines FILE``, which finds the machine by ``METALSEED_BMC_GUID`` and acts
on ``METALSEED_POWER``. ``power_hook(FILE)`` is the same as a Python callable.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from . import machinesfile

log = logging.getLogger(__name__)

QEMU = "qemu-system-x86_64"
KVM_DEVICE = Path("/dev/kvm")
_KVM_GET_API_VERSION, _KVM_CREATE_VM = 0xAE00, 0xAE01
_SAFE_NAME = "abcdefghijklmnopqrstuvwxyz0123456789-_."


class QemuError(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class VmSpec:
    name: str
    uuid: str  # SMBIOS system UUID == the BMC's system GUID
    mac: str
    tap: str
    netns: str | None = None  # the namespace that owns the tap (None: this one)
    memory: int = 256  # MiB
    disks: tuple[int, ...] = ()  # sizes in MiB of virtio data disks
    #: ms before the firmware retries when nothing booted (-1: never)
    reboot_timeout: int = 5000

    def __post_init__(self) -> None:
        if not self.name or any(c not in _SAFE_NAME for c in self.name.lower()):
            raise QemuError(f"bad machine name {self.name!r}")
        uuidlib.UUID(self.uuid)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> VmSpec:
        data = dict(obj)
        data["disks"] = tuple(data.get("disks", ()))
        return cls(**data)

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "disks": list(self.disks)}


@dataclasses.dataclass(frozen=True)
class VmPaths:
    """Where one machine's files live in the state directory."""

    state_dir: Path
    name: str

    def _p(self, suffix: str) -> Path:
        return self.state_dir / f"{self.name}{suffix}"

    pid = property(lambda self: self._p(".pid"))
    lock = property(lambda self: self._p(".lock"))
    serial = property(lambda self: self._p(".serial.log"))
    stderr = property(lambda self: self._p(".qemu.log"))
    info = property(lambda self: self._p(".json"))

    def disk(self, n: int) -> Path:
        return self._p(f".disk{n}.img")


# -- acceleration ----------------------------------------------------------------


def kvm_usable(cpuinfo: Path = Path("/proc/cpuinfo"), device: Path = KVM_DEVICE) -> bool:
    """True only when the CPU has vmx/svm and /dev/kvm can create a VM.

    ``/dev/kvm`` existing is not enough: without the CPU flags QEMU hangs or
    aborts ("failed to set MSR 0x10a").
    """
    try:
        flags = {
            flag
            for line in cpuinfo.read_text().splitlines()
            if line.startswith("flags")
            for flag in line.partition(":")[2].split()
        }
    except OSError:
        return False
    if not flags & {"vmx", "svm"}:
        return False
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if fcntl.ioctl(fd, _KVM_GET_API_VERSION) != 12:
            return False
        vm = fcntl.ioctl(fd, _KVM_CREATE_VM, 0)
        os.close(vm)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def accelerator() -> str:
    """``kvm`` or ``tcg``; ``METALSEED_QEMU_ACCEL`` forces one."""
    forced = os.environ.get("METALSEED_QEMU_ACCEL", "")
    if forced in ("kvm", "tcg"):
        return forced
    return "kvm" if kvm_usable() else "tcg"


# -- the command line ---------------------------------------------------------------


def qemu_argv(spec: VmSpec, paths: VmPaths, accel: str = "tcg") -> list[str]:
    """The QEMU command line for ``spec`` (pure)."""
    argv = [
        QEMU,
        "-name",
        f"metalseed-{spec.name}",
        "-machine",
        f"pc,accel={accel}",
        "-m",
        str(spec.memory),
        "-smp",
        "1",
        "-smbios",
        f"type=1,uuid={spec.uuid}",
        "-uuid",
        spec.uuid,
        # firmware output reaches -serial only with -nographic (see lab-facts)
        "-nographic",
        "-serial",
        f"file:{paths.serial}",
        "-monitor",
        "none",
        "-boot",
        f"order=n,reboot-timeout={spec.reboot_timeout}",
        "-netdev",
        f"tap,id=net0,ifname={spec.tap},script=no,downscript=no",
        # QEMU's default ROM for virtio-net-pci is ipxe-qemu's efi-virtio.rom
        "-device",
        f"virtio-net-pci,netdev=net0,mac={spec.mac},bootindex=1",
        "-pidfile",
        str(paths.pid),
    ]
    if accel == "kvm":
        argv += ["-cpu", "host"]
    for n, _ in enumerate(spec.disks):
        argv += ["-drive", f"file={paths.disk(n)},if=virtio,format=raw,cache=unsafe"]
    return argv


# -- processes --------------------------------------------------------------------


def _proc_state(pid: int) -> str | None:
    """The one-letter state of ``pid`` (None: no such process)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[0]


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def vm_pid(paths: VmPaths) -> int | None:
    """The PID of the machine's QEMU if it is running (the PID checked to be it)."""
    try:
        pid = int(paths.pid.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    _reap(pid)  # a VM started from this process and since exited
    state = _proc_state(pid)
    if state is None or state in "ZX":
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    return pid if str(paths.pid).encode() in cmdline else None


@contextlib.contextmanager
def _locked(paths: VmPaths) -> Iterator[None]:
    paths.state_dir.mkdir(parents=True, exist_ok=True)
    with paths.lock.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def start_vm(spec: VmSpec, state_dir: Path, *, accel: str | None = None, wait: float = 10.0) -> int:
    """Power the machine on: start QEMU (in ``spec.netns``) unless it runs; return its PID."""
    paths = VmPaths(state_dir, spec.name)
    with _locked(paths):
        pid = vm_pid(paths)
        if pid is not None:
            return pid
        for n, size in enumerate(spec.disks):
            if not paths.disk(n).exists():
                with paths.disk(n).open("wb") as fh:
                    fh.truncate(size << 20)  # sparse
        accel = accel or accelerator()
        argv = qemu_argv(spec, paths, accel)
        if spec.netns:
            argv = ["ip", "netns", "exec", spec.netns, *argv]  # execs QEMU: same PID
        paths.serial.unlink(missing_ok=True)
        with paths.stderr.open("w") as err:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err, start_new_session=True
            )
        paths.pid.write_text(f"{proc.pid}\n")
        info = {"pid": proc.pid, "started": time.time(), "accel": accel, "argv": argv}
        paths.info.write_text(json.dumps({**info, "spec": spec.to_json()}, indent=2) + "\n")
        # ready once QEMU has opened its serial log (the machine is running then)
        deadline = time.monotonic() + wait
        while not paths.serial.exists():
            if proc.poll() is not None:
                paths.pid.unlink(missing_ok=True)
                raise QemuError(
                    f"QEMU for {spec.name} exited {proc.returncode}: "
                    f"{paths.stderr.read_text().strip()[-800:]}"
                )
            if time.monotonic() > deadline:
                _kill(proc.pid, paths, grace=2.0)
                raise QemuError(f"QEMU for {spec.name} did not start within {wait} s")
            time.sleep(0.02)
        log.info("machine %s powered on: QEMU pid %s (%s)", spec.name, proc.pid, accel)
        return proc.pid


def _kill(pid: int, paths: VmPaths, grace: float) -> None:
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            _reap(pid)
            if _proc_state(pid) in (None, "Z", "X"):
                paths.pid.unlink(missing_ok=True)
                return
            time.sleep(0.02)
    _reap(pid)
    if _proc_state(pid) not in (None, "Z", "X"):
        raise QemuError(f"QEMU pid {pid} did not stop")
    paths.pid.unlink(missing_ok=True)


def stop_vm(name: str, state_dir: Path, *, grace: float = 5.0) -> int | None:
    """Power the machine off: stop its QEMU by PID. Returns the PID stopped, if any."""
    paths = VmPaths(state_dir, name)
    with _locked(paths):
        pid = vm_pid(paths)
        if pid is None:
            paths.pid.unlink(missing_ok=True)
            return None
        _kill(pid, paths, grace)
        log.info("machine %s powered off: QEMU pid %s stopped", name, pid)
        return pid


def vm_running(name: str, state_dir: Path) -> bool:
    return vm_pid(VmPaths(state_dir, name)) is not None


# -- machines files and power hooks ---------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Machines:
    state_dir: Path
    specs: tuple[VmSpec, ...]

    def by_guid(self, guid: str) -> VmSpec | None:
        want = uuidlib.UUID(guid)
        for spec in self.specs:
            if uuidlib.UUID(spec.uuid) == want:
                return spec
        return None

    def by_name(self, name: str) -> VmSpec | None:
        return next((s for s in self.specs if s.name == name), None)


def write_machines(path: Path, state_dir: Path, specs: Sequence[VmSpec]) -> Path:
    """Write a machines file: where the VMs keep their state, and each VM's spec."""
    return machinesfile.write(path, state_dir, specs)


def read_machines(path: Path) -> Machines:
    return Machines(*machinesfile.read(path, VmSpec.from_json, QemuError))


def lab_mac(guid: str) -> str:
    """A stable MAC in QEMU's 52:54:00 block for the machine with this UUID."""
    tail = uuidlib.UUID(guid).bytes[-3:]
    return "52:54:00:" + ":".join(f"{b:02x}" for b in tail)


def stop_all(machines: Machines) -> list[str]:
    """Power every machine off; the names of those that were running."""
    return [s.name for s in machines.specs if stop_vm(s.name, machines.state_dir) is not None]


def set_power(machines: Machines, spec: VmSpec, state: str) -> None:
    """Apply a BMC power change (on, off, reset) to a machine."""
    if state == "on":
        start_vm(spec, machines.state_dir)
    elif state == "off":
        stop_vm(spec.name, machines.state_dir)
    elif state == "reset":
        stop_vm(spec.name, machines.state_dir)
        start_vm(spec, machines.state_dir)
    else:
        raise QemuError(f"unknown power state {state!r}")


def power_hook(machines_file: Path) -> Callable[[Any, str], None]:
    """A Python power hook for ``BmcSimulator``: the BMC's GUID picks the machine."""

    def hook(bmc: Any, state: str) -> None:
        machines = read_machines(machines_file)
        spec = machines.by_guid(str(bmc.uuid))
        if spec is None:
            log.warning("no QEMU machine for BMC GUID %s", bmc.uuid)
            return
        set_power(machines, spec, state)

    return hook


def hook_argv(machines_file: Path) -> list[str]:
    """The command for ``metalseed lab bmc --power-hook`` (``shlex.join`` it)."""
    return [sys.executable, "-m", "bootstrap.lab.qemu", "hook", "--machines", str(machines_file)]


def hook_command(machines_file: Path) -> str:
    return shlex.join(hook_argv(machines_file))


# -- command line -----------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bootstrap.lab.qemu",
        description="Power QEMU lab machines on and off (also as a BMC power hook).",
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    for cmd in ("on", "off", "status"):
        p = sub.add_parser(cmd)
        p.add_argument("names", nargs="*", help="machine names (default: all)")
    hook = sub.add_parser(
        "hook", help="run as a BMC power hook: METALSEED_POWER, METALSEED_BMC_GUID from env"
    )
    for p in sub.choices.values():
        p.add_argument("--machines", type=Path, required=True, help="machines file (JSON)")
    del hook
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="qemu-lab: %(message)s", stream=sys.stderr)
    try:
        machines = read_machines(args.machines)
        if args.cmd == "hook":
            state, guid = os.environ.get("METALSEED_POWER"), os.environ.get("METALSEED_BMC_GUID")
            if not state or not guid:
                raise QemuError("hook: METALSEED_POWER and METALSEED_BMC_GUID must be set")
            spec = machines.by_guid(guid)
            if spec is None:
                log.warning("no machine for BMC GUID %s in %s", guid, args.machines)
                return 0
            set_power(machines, spec, state)
            return 0
        specs = [machines.by_name(n) for n in args.names] if args.names else machines.specs
        if None in specs:
            raise QemuError(f"unknown machine among {', '.join(args.names)}")
        for spec in specs:
            if args.cmd == "on":
                print(f"{spec.name} on (pid {start_vm(spec, machines.state_dir)})")
            elif args.cmd == "off":
                pid = stop_vm(spec.name, machines.state_dir)
                print(f"{spec.name} off" + (f" (stopped pid {pid})" if pid else " (was off)"))
            else:
                pid = vm_pid(VmPaths(machines.state_dir, spec.name))
                print(f"{spec.name} " + (f"on (pid {pid})" if pid else "off"))
    except (QemuError, OSError) as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
