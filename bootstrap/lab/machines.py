"""The lab's machine kinds: how each is wired, powered on and off, and described.

* ``qemu``: a TCG VM (``lab.qemu``) with the ipxe-qemu NIC ROM, its tap on the
  provisioning bridge, virtio data disks (sparse files), console in a log.
* ``netns``: a namespace of its own with a veth on the provisioning bridge and
  loop-device disks; power-on netboots it with the firmware emulator and
  boots the downloaded image under ``systemd-nspawn`` (``lab.netnsmachine``).
* ``fake``: the firmware's steps for real (DHCP as PXE and iPXE, TFTP, HTTP,
  checksums) and an enlist with a generated inventory, then nothing
  (``lab.fakemachine``); every fake of a lab shares one namespace and one
  interface, and one process boots them all -- for scale.

The BMC simulator's power hook is ``python -m bootstrap.lab.machines hook
LAB_DIR``: it finds the machine by the BMC's GUID in the lab record and
powers it by its kind.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .labstate import LabState, LabStore, Machine
from .netns import Netns

if TYPE_CHECKING:
    from .rack import Rack

log = logging.getLogger(__name__)


def machine_mac(n: int, guid: str) -> str:
    """The lab's MAC for machine number ``n``: unique within a lab up to 2**24 machines."""
    return "52:54:00:" + ":".join(f"{(n >> s) & 0xFF:02x}" for s in (16, 8, 0))


def _vm_dir(lab_dir: Path) -> Path:
    return lab_dir / "machines"


def _vm_spec(state: LabState, machine: Machine, n: int | None = None):
    from .qemu import VmSpec

    return VmSpec(
        name=machine.name,
        uuid=machine.uuid,
        mac=machine.mac,
        tap=f"q{machine.mac.replace(':', '')[-6:]}",
        netns=state.ns("sw"),
        memory=machine.memory or 1536,
        disks=tuple(machine.disks),
    )


def _fakes_file(lab_dir: Path) -> Path:
    return lab_dir / "fakes.json"


def _write_fakes(lab_dir: Path, state: LabState) -> None:
    from .fakemachine import FakeSpec, write_machines

    specs = [
        FakeSpec(
            name=m.name,
            uuid=m.uuid,
            mac=m.mac,
            interface="eth0",
            netns=state.ns("fake"),
            disks=len(m.disks) or None,
        )
        for m in state.machines
        if m.kind == "fake"
    ]
    write_machines(_fakes_file(lab_dir), lab_dir / "fakes", specs)


def create(rack: Rack, state: LabState, machine: Machine, n: int) -> None:
    """Wire a new machine to the provisioning segment (powered off)."""
    if machine.kind == "fake":
        ns = Netns(state.ns("fake"))
        if not ns.exists():
            rack._namespace(state, "fake")
            rack._veth(Netns(state.ns("sw")), "prov", "fk", ns, "eth0")
        machine.netns = ns.name
        rack.store.save(state)
        _write_fakes(rack.dir, state)
        return
    if machine.kind == "qemu":
        spec = _vm_spec(state, machine)
        sw = Netns(state.ns("sw"))
        sw.ip("tuntap", "add", "dev", spec.tap, "mode", "tap")
        sw.ip("link", "set", spec.tap, "master", "prov", "up")
        machine.netns = sw.name
        rack.store.save(state)
        return
    if machine.kind == "netns":
        from .netnsmachine import Paths, create_disks

        ns = rack._namespace(state, f"m{n}")
        rack._veth(Netns(state.ns("sw")), "prov", f"m{n}", ns, "eth0", mac=machine.mac)
        machine.netns = ns.name
        rack.store.save(state)
        create_disks(Paths(rack.dir, machine.name), machine.disks)
        return
    raise NotImplementedError(machine.kind)


def power_on(lab_dir: Path, state: LabState, machine: Machine) -> None:
    if machine.kind == "fake":
        from .fakemachine import power

        power(_fakes_file(lab_dir), machine.uuid, "on")
        return
    if machine.kind == "qemu":
        from .qemu import start_vm

        start_vm(_vm_spec(state, machine), _vm_dir(lab_dir))
        return
    if machine.kind == "netns":
        from . import netnsmachine

        netnsmachine.power_on(lab_dir, state, machine)
        return
    raise NotImplementedError(machine.kind)


def power_off_machine(lab_dir: Path, state: LabState, machine: Machine) -> bool:
    if machine.kind == "fake":
        from .fakemachine import power

        return power(_fakes_file(lab_dir), machine.uuid, "off") is not None
    if machine.kind == "qemu":
        from .qemu import stop_vm

        return stop_vm(machine.name, _vm_dir(lab_dir)) is not None
    if machine.kind == "netns":
        from . import netnsmachine

        return netnsmachine.power_off(lab_dir, machine)
    return False


def stop_all(rack: Rack, state: LabState) -> int:
    """Power every machine off (``lab down``); how many were running."""
    stopped = sum(power_off_machine(rack.dir, state, m) for m in state.machines if m.kind != "fake")
    if any(m.kind == "fake" for m in state.machines) and _fakes_file(rack.dir).exists():
        from .fakemachine import rack_status, read_machines, stop_rack

        fakes = read_machines(_fakes_file(rack.dir))
        status = rack_status(fakes, state.ns("fake")) or {}
        stopped += sum(1 for row in status.values() if row.get("power") == "on")
        stop_rack(fakes, state.ns("fake"))
    return stopped


def _powered(rack: Rack, state: LabState) -> dict[str, bool]:
    from .netnsmachine import Paths, running
    from .qemu import vm_running

    on = {m.name: vm_running(m.name, _vm_dir(rack.dir)) for m in state.machines if m.kind == "qemu"}
    on.update(
        {m.name: running(Paths(rack.dir, m.name)) for m in state.machines if m.kind == "netns"}
    )
    if any(m.kind == "fake" for m in state.machines) and _fakes_file(rack.dir).exists():
        from .fakemachine import rack_status, read_machines

        status = rack_status(read_machines(_fakes_file(rack.dir)), state.ns("fake")) or {}
        on.update({name: row.get("power") == "on" for name, row in status.items()})
    return on


def release(rack: Rack, state: LabState) -> int:
    """Loop devices and mounts of the lab's machines; the number of loop devices freed."""
    from . import netnsmachine

    return netnsmachine.release(rack.dir, state)


def describe_all(rack: Rack, state: LabState) -> list[dict[str, Any]]:
    """A row per machine: kind, power, BMC, address and node state from the seed's store."""
    from ..actions import open_store
    from ..guid import uuid_candidates

    powered = _powered(rack, state)
    rows = []
    store = open_store(rack.config) if rack.config.db_path.exists() else None
    try:
        leases = {lease.mac: lease.ip for lease in store.leases()} if store else {}
        for machine in state.machines:
            node = None
            if store is not None:
                node = next(
                    (n for g in uuid_candidates(machine.uuid) if (n := store.node_by_guid(g))),
                    None,
                )
            rows.append(
                {
                    "machine": machine.name,
                    "kind": machine.kind,
                    "mac": machine.mac,
                    "bmc": machine.bmc,
                    "power": "on" if powered.get(machine.name) else "off",
                    "ip": leases.get(machine.mac),
                    "node": node.id if node else None,
                    "state": str(node.state) if node else None,
                    "disks": [f"{d // 1024}G" if d >= 1024 else f"{d}M" for d in machine.disks],
                }
            )
    finally:
        if store is not None:
            store.close()
    return rows


# -- the BMC power hook --------------------------------------------------------------------


def hook(lab_dir: Path, power: str, guid: str) -> int:
    state = LabStore(lab_dir).load()
    if state is None:
        log.error("no lab recorded in %s", lab_dir)
        return 1
    machine = state.machine(guid)
    if machine is None:
        log.warning("no lab machine behind BMC GUID %s", guid)
        return 0
    if power == "on":
        power_on(lab_dir, state, machine)
    elif power == "off":
        power_off_machine(lab_dir, state, machine)
    elif power == "reset":
        power_off_machine(lab_dir, state, machine)
        power_on(lab_dir, state, machine)
    else:
        log.error("unknown power state %r", power)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bootstrap.lab.machines")
    sub = parser.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("hook", help="BMC power hook: METALSEED_POWER, METALSEED_BMC_GUID")
    h.add_argument("lab_dir", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="lab-machines: %(message)s", stream=sys.stderr)
    power, guid = os.environ.get("METALSEED_POWER"), os.environ.get("METALSEED_BMC_GUID")
    if not power or not guid:
        log.error("METALSEED_POWER and METALSEED_BMC_GUID must be set")
        return 2
    try:
        return hook(args.lab_dir, power, guid)
    except Exception as exc:  # a hook's failure is the BMC's error to report; say why
        log.error("power %s for %s failed: %s", power, guid, exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())


def console_log(lab_dir: Path, machine: Machine) -> Path | None:
    """Where a machine's console goes: the VM's serial port, the container's console."""
    if machine.kind == "qemu":
        from .qemu import VmPaths

        return VmPaths(_vm_dir(lab_dir), machine.name).serial
    if machine.kind == "netns":
        return lab_dir / "machines" / machine.name / "console.log"
    return None  # fakes have no console: their steps are in the fake rack's log
