"""`metalseed lab up|down|status`: a whole rack of simulated machines on one box.

The lab builds two L2 segments as bridges inside a switch namespace it makes
(``msl<ID>-sw``): *provisioning* and *BMC*. The seed gets a leg on each
(namespace ``msl<ID>-seed``: ``prov0`` and ``bmc0``); the simulated BMCs live
in ``msl<ID>-bmc``, one address each on the BMC segment, served by
``metalseed lab bmc`` processes whose power hook is this module's ``hook``
(it starts and stops the machine behind the BMC, whatever its kind). Nothing
is added to the host's own namespace.

Unless ``--no-seed``, the seed daemon (``metalseed run``) runs in the seed
namespace with the lab's config: it sweeps the BMC segment, enrolls,
netboots and enlists what it finds, exactly as on real hardware. ``lab up``
on a lab that is up adds machines, powered off -- racking new machines; the
seed's next sweep finds them.

Everything made is recorded first (``labstate``), so ``lab down`` removes it
all, also after a crash of ``lab up`` itself.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import secrets
import shlex
import shutil
import subprocess
import sys
import time
import uuid as uuidlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from ..config import Config
from ..errors import FatalError, UsageError
from .labstate import LabState, LabStore, Machine, Process, runs, stop
from .netns import NETNS_DIR, Netns, _ip

log = logging.getLogger(__name__)

PROV_NET = "10.231.0.0/21"  # room for the 1,000-machine storm: ~1,900 leases
BMC_NET = "10.232.0.0/21"
FIRST_BMC_HOST = 10  # BMC n is .10+n on the BMC segment
FACTORY_LOGIN = "admin:lab-factory-pw"  # the simulated BMCs' sticker login
KINDS = ("qemu", "netns", "fake")
SEED_HTTP_PORT = 80


class LabError(FatalError):
    pass


def _hosts(net: str) -> list[str]:
    return [str(h) for h in ipaddress.ip_network(net).hosts()]


def seed_address(net: str) -> str:
    return _hosts(net)[0]


def pool(net: str) -> str:
    hosts = _hosts(net)
    return f"{hosts[99]}-{hosts[-5]}"


def parse_disks(spec: str) -> list[int]:
    """``2x20G`` / ``512M`` / ``1x1G,1x2G`` -> sizes in MiB."""
    out: list[int] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        count, _, size = part.rpartition("x")
        n = int(count) if count else 1
        unit = size[-1:].upper()
        scale = {"M": 1, "G": 1024, "T": 1024 * 1024}.get(unit)
        if scale is None or not size[:-1].isdigit() or n < 1:
            raise UsageError(f"bad disk spec {part!r}: use e.g. 2x20G or 512M")
        out += [int(size[:-1]) * scale] * n
    return out


#: ceph.conf options for lab machines, which share one host's memory and disk
LAB_CEPH_OPTIONS = (
    "bluestore_cache_autotune=false",
    "bluestore_cache_size=64M",
    "osd_memory_target=896M",
    "mon_data_avail_warn=2",  # the host's disk may be nearly full
    "mgr_initial_modules=iostat",
    "mon_osd_min_down_reporters=1",  # one host down is seen at once
)


def seed_toml(state: LabState, config: Config, lab_dir: Path) -> str:
    """The seed daemon's config for this lab (pure)."""
    return "\n".join(
        [
            f'state_dir = "{config.state_dir}"',
            "",
            "[bmc]",
            "timeout = 2.0",
            "",
            "[discovery]",
            f'ranges = ["{state.bmc_net}"]',
            f'credentials_file = "{lab_dir / "bmc-credentials"}"',
            "rotate = true",
            "probe_timeout = 0.3",
            "",
            "[boot]",
            'interface = "prov0"',
            'mode = "full"',
            f'pool = "{pool(state.prov_net)}"',
            f"http_port = {SEED_HTTP_PORT}",
            "",
            "[run]",
            "sweep_interval = 5.0",
            "tick = 1.0",
            "boot_timeout = 600.0",
            "",
            "[join]",
            f"auto = {'true' if state.auto_join else 'false'}",
            "# many machines share one small host: Ceph's memory kept to its minimums",
            f"ceph_options = {json.dumps(list(LAB_CEPH_OPTIONS))}",
            "",
        ]
    )


class Rack:
    """The lab of one state directory: ``STATE_DIR/lab``."""

    def __init__(self, config: Config, *, python: Sequence[str] = (sys.executable,)) -> None:
        self.config = config
        self.dir = config.state_dir / "lab"
        self.store = LabStore(self.dir)
        self.python = list(python)

    # -- building ----------------------------------------------------------------------

    def _record(self, state: LabState, mutate: Callable[[LabState], None]) -> None:
        mutate(state)
        self.store.save(state)

    def _namespace(self, state: LabState, role: str) -> Netns:
        ns = Netns(state.ns(role))
        if not ns.exists():
            self._record(state, lambda s: s.namespaces.append(ns.name))
            _ip("netns", "add", ns.name)
            ns.ip("link", "set", "lo", "up")
        return ns

    def _veth(self, sw: Netns, bridge: str, port: str, ns: Netns, ifname: str, **kw) -> None:
        sw.ip("link", "add", port, "type", "veth", "peer", "name", f"{port}x")
        sw.ip("link", "set", f"{port}x", "netns", ns.name)
        ns.ip("link", "set", f"{port}x", "name", ifname)
        if kw.get("mac"):
            ns.ip("link", "set", ifname, "address", kw["mac"])
        if kw.get("address"):
            ns.ip("addr", "add", kw["address"], "dev", ifname)
        ns.ip("link", "set", ifname, "up")
        sw.ip("link", "set", port, "master", bridge, "up")

    def _segments(self, state: LabState) -> None:
        sw = self._namespace(state, "sw")
        for bridge in ("prov", "bmc"):
            sw.ip("link", "add", bridge, "type", "bridge", "forward_delay", "0", "stp_state", "0")
            sw.ip("link", "set", bridge, "up")
        seed = self._namespace(state, "seed")
        prov_prefix = ipaddress.ip_network(state.prov_net).prefixlen
        bmc_prefix = ipaddress.ip_network(state.bmc_net).prefixlen
        self._veth(
            sw, "prov", "sp", seed, "prov0", address=f"{seed_address(state.prov_net)}/{prov_prefix}"
        )
        self._veth(
            sw, "bmc", "sb", seed, "bmc0", address=f"{seed_address(state.bmc_net)}/{bmc_prefix}"
        )
        bmcs = self._namespace(state, "bmc")
        self._veth(sw, "bmc", "bb", bmcs, "eth0")

    def up(
        self,
        kinds: Mapping[str, int],
        *,
        disks: Sequence[int] = (),
        memory: int = 1536,
        seed: bool = True,
        join: bool = True,
        image: Callable[[], object] | None = None,
        progress: Callable[[str], None] = lambda text: None,
    ) -> tuple[LabState, list[Machine]]:
        """Build the lab if needed, add the machines asked for (powered off), start the seed."""
        for kind in kinds:
            if kind not in KINDS:
                raise UsageError(f"unknown machine kind {kind!r}: {', '.join(KINDS)}")
        with self.store.locked():
            state = self.store.load()
            fresh = state is None
            if state is None:
                state = LabState(
                    id=secrets.token_hex(2),
                    created=time.time(),
                    prov_net=PROV_NET,
                    bmc_net=BMC_NET,
                    owns_store=not self.config.db_path.exists(),
                    auto_join=join,
                )
                self.store.save(state)
                progress(f"lab {state.id}: building the provisioning and BMC segments")
                self._segments(state)
                creds = self.dir / "bmc-credentials"
                creds.write_text(FACTORY_LOGIN + "\n")
                creds.chmod(0o600)
            added = self._add_machines(state, kinds, disks, memory, progress)
            if seed and not any(p.name == "seed" and runs(p) for p in state.processes):
                if image is not None:
                    progress("boot image: making sure the seed has one")
                    image()
                self._start_seed(state, progress)
            elif fresh and not seed:
                progress("no seed started (--no-seed)")
            return state, added

    def _add_machines(
        self,
        state: LabState,
        kinds: Mapping[str, int],
        disks: Sequence[int],
        memory: int,
        progress: Callable[[str], None],
    ) -> list[Machine]:
        from . import machines as kinds_impl

        added: list[Machine] = []
        bmc_hosts = _hosts(state.bmc_net)
        for kind, count in kinds.items():
            for _ in range(count):
                n = len(state.machines) + 1
                guid = str(uuidlib.uuid4())
                machine = Machine(
                    name=f"{kind}{sum(m.kind == kind for m in state.machines) + 1}",
                    kind=kind,
                    uuid=guid,
                    mac=kinds_impl.machine_mac(n, guid),
                    bmc=f"{bmc_hosts[FIRST_BMC_HOST + n - 1]}:623",
                    disks=list(disks),
                    memory=memory if kind == "qemu" else 0,
                )
                self._record(state, lambda s, m=machine: s.machines.append(m))
                kinds_impl.create(self, state, machine, n)
                added.append(machine)
        if added:
            progress(
                f"racked {len(added)} machine(s): "
                + ", ".join(f"{m.name} ({m.mac}, BMC {m.bmc})" for m in added)
            )
            self._start_bmcs(state, added)
        return added

    def _start_bmcs(self, state: LabState, machines: Sequence[Machine]) -> None:
        bmcns = Netns(state.ns("bmc"))
        prefix = ipaddress.ip_network(state.bmc_net).prefixlen
        for m in machines:
            bmcns.ip("addr", "add", f"{m.bmc.rsplit(':', 1)[0]}/{prefix}", "dev", "eth0")
        batch = state.bmc_batches + 1
        spec = self.dir / f"bmcs-{batch}.json"
        manifest = self.dir / f"bmcs-{batch}.manifest.json"
        spec.write_text(
            json.dumps(
                {
                    "bmcs": [
                        {"address": m.bmc.rsplit(":", 1)[0], "port": 623, "guid": m.uuid}
                        for m in machines
                    ]
                },
                indent=2,
            )
        )
        hook = shlex.join([*self.python, "-m", "bootstrap.lab.machines", "hook", str(self.dir)])
        argv = [*self.python, "-m", "bootstrap", "lab", "bmc", "--spec", str(spec)]
        argv += ["--credentials", str(self.dir / "bmc-credentials")]
        argv += ["--manifest", str(manifest), "--power-hook", hook]
        self._spawn(state, f"bmcs-{batch}", bmcns, argv, tag=str(spec))
        self._record(state, lambda s: setattr(s, "bmc_batches", batch))
        _wait_for(manifest, f"the BMC simulator for batch {batch}", self.dir / f"bmcs-{batch}.log")

    def _spawn(self, state: LabState, name: str, ns: Netns, argv: list[str], *, tag: str) -> None:
        logfile = self.dir / f"{name}.log"
        with logfile.open("a") as fh:
            proc = subprocess.Popen(
                [*ns.prefix, *argv],
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        # `ip netns exec` execs the command: the PID is the command's own
        process = Process(name=name, pid=proc.pid, tag=tag, log=str(logfile))
        self._record(state, lambda s: s.processes.append(process))

    def _start_seed(self, state: LabState, progress: Callable[[str], None]) -> None:
        toml = self.dir / "seed.toml"
        toml.write_text(seed_toml(state, self.config, self.dir))
        status = self.config.state_dir / "serve.json"
        status.unlink(missing_ok=True)
        argv = [*self.python, "-m", "bootstrap", "--config", str(toml), "run"]
        self._spawn(state, "seed", Netns(state.ns("seed")), argv, tag=str(toml))
        _wait_for(status, "the seed daemon (metalseed run)", self.dir / "seed.log", 90)
        progress(
            f"seed: metalseed run in {state.ns('seed')} on prov0 "
            f"({seed_address(state.prov_net)}), sweeping {state.bmc_net}"
        )

    # -- tearing down -------------------------------------------------------------------

    def down(self, progress: Callable[[str], None] = lambda text: None) -> dict[str, int]:
        """Remove everything the lab recorded; safe to run twice, and after a crash."""
        from . import machines as kinds_impl

        with self.store.locked():
            state = self.store.load()
            if state is None:
                return {"processes": 0, "machines": 0, "namespaces": 0}
            done = {"processes": 0, "machines": 0, "namespaces": 0, "loops": 0}
            seed = [p for p in state.processes if p.name == "seed"]
            for process in seed + [p for p in reversed(state.processes) if p.name != "seed"]:
                done["processes"] += stop(process)
            done["machines"] = kinds_impl.stop_all(self, state)
            done["loops"] = kinds_impl.release(self, state)
            for name in reversed(state.namespaces):
                if (NETNS_DIR / name).exists():
                    proc = _ip("netns", "del", name, check=False)
                    if proc.returncode != 0:
                        raise LabError(f"could not remove namespace {name}: {proc.stderr}")
                    done["namespaces"] += 1
            # the machines' disks and downloaded boot files go with the lab
            shutil.rmtree(self.dir / "machines", ignore_errors=True)
            if state.owns_store:
                for path in self.config.state_dir.glob(self.config.db_path.name + "*"):
                    path.unlink(missing_ok=True)
                shutil.rmtree(self.config.state_dir / "join", ignore_errors=True)
            self.store.remove()
            progress(
                f"lab {state.id} down: {done['processes']} processes, {done['machines']} "
                f"running machines, {done['namespaces']} namespaces, {done['loops']} loop devices"
            )
            return done

    # -- looking -----------------------------------------------------------------------

    def status(self) -> tuple[LabState | None, list[dict]]:
        from . import machines as kinds_impl

        state = self.store.load()
        if state is None:
            return None, []
        return state, kinds_impl.describe_all(self, state)


def _wait_for(path: Path, what: str, logfile: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            tail = logfile.read_text()[-1500:] if logfile.exists() else ""
            raise LabError(f"{what} not ready within {timeout:.0f} s; its log ends:\n{tail}")
        time.sleep(0.1)
