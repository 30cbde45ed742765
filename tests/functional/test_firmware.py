"""The firmware emulator and fake machines against a real `metalseed serve` in namespaces.

Each test builds a provisioning segment: a switch namespace with a bridge,
the seed namespace (``prov0``, 10.97.0.1/24) running ``metalseed serve`` in
full mode, and machine namespaces on the bridge. The emulator runs inside a
machine namespace as ``python -m bootstrap.lab.firmware`` (one machine) or
``python -m bootstrap.lab.fakemachine boot`` (many fakes sharing one
interface), and prints its results as JSON; the seed's side is read with
``metalseed events`` / ``nodes`` or from its log. The image is three small
random files; the iPXE binary is Debian's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from bootstrap.image.catalogue import Catalogue
from bootstrap.lab.fakemachine import (
    FakeSpec,
    hook_command,
    rack_pid,
    read_machines,
    stop_rack,
    write_machines,
)
from bootstrap.lab.netns import Netns
from tests.conftest import REPO, cli, start_serve, stop_process

pytestmark = [pytest.mark.root, pytest.mark.netns]

NET = "10.97"
SEED_IP = f"{NET}.0.1"
POOL = (f"{NET}.0.100", f"{NET}.0.199")
GUID = "6f1c3e2a-58d4-4b7e-9a15-2c7d0e8b4f93"
UNDIONLY = Path("/usr/lib/ipxe/undionly.kpxe")
STEPS = ("dhcp.offer", "dhcp.ack", "tftp.start", "tftp.sent", "http.script", "http.file")

if not UNDIONLY.exists():
    pytest.skip("needs Debian's ipxe package", allow_module_level=True)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def in_pool(ip: str) -> bool:
    return ip.startswith(f"{NET}.0.") and 100 <= int(ip.rsplit(".", 1)[1]) <= 199


class Site:
    """The segment, the seed's state and image, ``metalseed serve``, machine namespaces."""

    def __init__(self, netlab, tmp_path: Path) -> None:
        self.lab = netlab
        self.tmp = tmp_path
        self.state = tmp_path / "state"
        self.switch = netlab.namespace("sw")
        self.bridge = netlab.bridge(self.switch)
        self.seed = netlab.namespace("seed")
        netlab.link(self.switch, self.bridge, self.seed, "prov0", address=f"{SEED_IP}/24")
        self.machines = 0
        self.serve: subprocess.Popen | None = None
        self.log = tmp_path / "serve.log"
        src = tmp_path / "image"
        src.mkdir()
        sizes = {"vmlinuz": 300_000, "initrd": 100_000, "rootfs.squashfs": 64_000}
        for name, size in sizes.items():
            (src / name).write_bytes(os.urandom(size))
        self.image = Catalogue(self.state / "images").add(
            "test-1", {n: src / n for n in sizes}, cmdline="console=ttyS0", make_current=True
        )

    def start(self) -> None:
        args = ["--interface", "prov0", "--mode", "full", "--pool", "-".join(POOL), "--no-ra"]
        env = {**os.environ, "METALSEED_BOOT_PROBE_SECONDS": "0.3"}
        self.serve = start_serve(self.seed, self.state, args, self.log, env=env)

    def stop(self) -> None:
        if self.serve is not None:
            stop_process(self.serve)

    def machine(self, mac: str):
        self.machines += 1
        ns = self.lab.namespace(f"m{self.machines}")
        self.lab.link(self.switch, self.bridge, ns, "eth0", mac=mac)
        return ns

    def firmware(self, ns, mac: str, guid: str, *args: str) -> tuple[int, dict]:
        argv = [sys.executable, "-m", "bootstrap.lab.firmware", "--interface", "eth0"]
        argv += ["--mac", mac, "--uuid", guid, *args]
        proc = ns.run(argv, cwd=REPO, timeout=120)
        assert proc.stdout.strip(), proc.stderr
        return proc.returncode, json.loads(proc.stdout)

    def events(self, node: str) -> list[dict]:
        out = cli("events", node, "--json", "--limit", "500", state_dir=self.state).stdout
        return sorted(json.loads(out), key=lambda e: e["id"])

    def nodes(self) -> list[dict]:
        return json.loads(cli("nodes", "list", "--json", state_dir=self.state).stdout)


@pytest.fixture
def site(netlab, tmp_path: Path) -> Iterator[Site]:
    site = Site(netlab, tmp_path)
    site.start()
    yield site
    site.stop()
    assert "metalseed.token" not in site.log.read_text()


def discovered(site: Site, bmc_sim, addr_block: str, creds_file: Path, guids, *hook: str):
    """BMCs with these GUIDs (and a power hook), discovered: their node ids."""
    spec = site.tmp / "bmcs.json"
    bmcs = [{"address": f"{addr_block}.{i + 1}", "guid": g} for i, g in enumerate(guids)]
    spec.write_text(json.dumps({"bmcs": bmcs}))
    sim = bmc_sim("--spec", str(spec), *hook)
    argv = ["discover", *sim.endpoints(), "--credentials", str(creds_file), "--json"]
    found = json.loads(cli(*argv, state_dir=site.state).stdout)
    by_guid = {f["guid"]: f["node"] for f in found}
    assert all(f["state"] == "enrolled" for f in found), found
    return [by_guid[g] for g in guids]


def steps_of(events: list[dict]) -> list[tuple[str, str]]:
    """(kind, detail) of the boot steps among a node's events."""
    out = []
    for event in events:
        if event["kind"] not in STEPS:
            continue
        data = event["data"]
        detail = data.get("client") or data.get("file") or data.get("profile") or ""
        out.append((event["kind"], detail))
    return out


# -- one machine, step by step --------------------------------------------------------------------


def test_a_known_machine_boots_step_by_step(site, bmc_sim, addr_block, creds_file, tmp_path):
    [node] = discovered(site, bmc_sim, addr_block, creds_file, [GUID])
    mac = "52:54:00:97:00:01"
    machine = site.machine(mac)
    code, result = site.firmware(machine, mac, GUID, "--download-dir", str(tmp_path / "dl"))
    assert code == 0 and result["outcome"] == "booted", result

    pxe, lease = result["pxe_lease"], result["lease"]
    assert in_pool(pxe["ip"]) and lease["ip"] == pxe["ip"] and lease["prefix"] == 24
    assert pxe["server_id"] == pxe["next_server"] == SEED_IP
    assert pxe["bootfile"] == "undionly.kpxe"
    assert lease["bootfile"] == f"http://{SEED_IP}/boot/52-54-00-97-00-01.ipxe"
    binary = result["ipxe_binary"]
    assert Path(binary["path"]).read_bytes() == UNDIONLY.read_bytes()
    assert binary["size"] == UNDIONLY.stat().st_size
    assert result["scripts"] == [lease["bootfile"]]

    files = {f["name"]: f for f in result["files"]}
    manifest = site.image.files
    for name, source in (("kernel", "vmlinuz"), ("initrd", "initrd")):
        assert files[name]["sha256"] == manifest[source].sha256, name
        assert files[name]["size"] == manifest[source].size and files[name]["verified"] == ["etag"]
        assert Path(files[name]["path"]).stat().st_size == manifest[source].size
    rootfs = files["rootfs.squashfs"]
    assert rootfs["sha256"] == manifest["rootfs.squashfs"].sha256
    assert rootfs["verified"] == ["etag", "cmdline"]
    params = result["params"]
    assert params["metalseed.node"] == node and params["metalseed.mac"] == mac
    assert params["BOOTIF"] == "01-52-54-00-97-00-01"
    assert params["metalseed.token"] == "********"  # the machine has it; it prints it masked
    assert "metalseed.token=********" in result["cmdline"]

    names = [s["name"] for s in result["steps"]]
    assert names == [
        "dhcp-pxe", "address", "tftp", "dhcp-ipxe", "script", "kernel", "initrd", "rootfs",
    ]  # fmt: skip
    assert all(s["ok"] for s in result["steps"])
    print(f"\n  firmware flow, one machine: {result['total']:.3f} s " + ", ".join(
        f"{s['name']} {s['seconds'] * 1000:.0f} ms" for s in result["steps"]
    ))  # fmt: skip

    # the seed saw every step, on the node its BMC was discovered as
    events = site.events(node)
    steps = steps_of(events)
    # the TFTP server records its events from a worker thread: they may land a little late
    tftp = [s for s in steps if s[0].startswith("tftp.")]
    assert tftp == [("tftp.start", "undionly.kpxe"), ("tftp.sent", "undionly.kpxe")]
    assert [s for s in steps if not s[0].startswith("tftp.")] == [
        ("dhcp.offer", "pxe"),
        ("dhcp.ack", "pxe"),
        ("dhcp.offer", "ipxe"),
        ("dhcp.ack", "ipxe"),
        ("http.script", "provision"),
        ("http.file", "vmlinuz"),
        ("http.file", "initrd"),
        ("http.file", "rootfs.squashfs"),
    ]
    moves = [(e["data"]["from"], e["data"]["to"]) for e in events if "from" in e["data"]]
    assert ("enrolled", "booting") in moves
    # the address left the interface when the emulator ended (no --keep-address)
    assert pxe["ip"] not in machine.ip("-4", "addr", "show", "eth0").stdout


def test_an_unknown_machine_is_served_and_logged(site):
    mac = "52:54:00:97:00:02"
    machine = site.machine(mac)
    code, result = site.firmware(machine, mac, str(uuid.uuid4()), "--arch", "7")
    assert code == 0 and result["outcome"] == "booted", result
    assert result["pxe_lease"]["bootfile"] == "ipxe.efi"  # UEFI: option 93 = 7
    assert result["params"]["metalseed.mode"] == "enlist"
    assert "metalseed.node" not in result["params"]
    assert result["params"]["metalseed.token"] == "********"  # masked in what is printed
    log = site.log.read_text()
    for step in ("DHCPACK", "TFTP ipxe.efi sent", "boot script: enlist", "download test-1/initrd"):
        assert f"unknown machine {mac}: {step}" in log, step


@pytest.mark.parametrize("tampered", ["initrd", "rootfs.squashfs"])
def test_a_tampered_download_is_detected_and_reported(site, tampered):
    path = site.image.path / tampered
    data = bytearray(path.read_bytes())
    data[1000:1004] = b"evil"  # same size: the server still serves it, with the old ETag
    path.write_bytes(bytes(data))
    mac = "52:54:00:97:00:03"
    machine = site.machine(mac)
    code, result = site.firmware(
        machine, mac, str(uuid.uuid4()), "--sleep-scale", "0", "--max-chains", "1"
    )
    assert code == 1 and result["outcome"] == "failed"
    assert "chained 1 times without booting" in result["error"]
    assert f"{tampered}: sha256 mismatch" in result["error"]  # the last failure, said
    # the script's own path: || goto failed, echo, sleep, chain to the script again
    assert len(result["failures"]) == 2
    assert all(f"{tampered}: sha256 mismatch" in f for f in result["failures"])
    assert result["scripts"] == [result["lease"]["bootfile"]] * 2
    assert any("failed, asking again" in e for e in result["echoes"])
    step = "initrd" if tampered == "initrd" else "rootfs"
    assert [s["ok"] for s in result["steps"] if s["name"] == step] == [False, False]
    assert site.image.files[tampered].sha256 != sha256_of(path)
    assert not any(f["name"] == tampered for f in result["files"])  # never accepted


# -- fake machines sharing one interface ----------------------------------------------------------


def fake_specs(site: Site, count: int, netns: str) -> list[FakeSpec]:
    return [
        FakeSpec(f"fake{i}", str(uuid.uuid4()), f"52:54:01:97:00:{i:02x}", "eth0", netns)
        for i in range(1, count + 1)
    ]


def rack_namespace(site: Site):
    ns = site.lab.namespace("rack")
    site.lab.link(site.switch, site.bridge, ns, "eth0", mac="52:54:00:97:ff:ff")
    return ns


def test_twenty_fakes_share_one_interface_and_enlist(site):
    rack = rack_namespace(site)
    specs = fake_specs(site, 20, rack.name)
    machines_file = write_machines(site.tmp / "fakes.json", site.tmp / "fakes", specs)
    started = time.monotonic()
    argv = [sys.executable, "-m", "bootstrap.lab.fakemachine", "boot"]
    proc = rack.run([*argv, "--machines", str(machines_file)], cwd=REPO, timeout=180)
    wall = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout)
    assert set(results) == {s.name for s in specs}

    ips = {r["lease"]["ip"] for r in results.values()}
    assert len(ips) == 20 and all(in_pool(ip) for ip in ips)
    for spec in specs:
        result = results[spec.name]
        assert result["outcome"] == "booted" and result["attempt"] == 1, result
        assert result["mac"] == spec.mac
        hyphen = spec.mac.replace(":", "-")
        assert result["scripts"] == [f"http://{SEED_IP}/boot/{hyphen}.ipxe"]
        assert result["ipxe_binary"]["sha256"] == sha256_of(UNDIONLY)
        assert {f["name"] for f in result["files"]} == {"kernel", "initrd", "rootfs.squashfs"}
        assert result["boot"]["enlisted"] is True, result["boot"]
        assert result["boot"]["state"] == "enlisted"
        assert (site.tmp / "fakes" / f"{spec.name}.result.json").exists()

    enlisted = {n["guid"]: n for n in site.nodes() if n["state"] == "enlisted"}
    assert set(enlisted) == {s.uuid for s in specs}
    nodes = {results[s.name]["boot"]["node"] for s in specs}
    assert nodes == {n["node"] for n in enlisted.values()}  # none duplicated
    shown = json.loads(cli("nodes", "show", nodes.pop(), "--json", state_dir=site.state).stdout)
    inventory = shown["inventory"]
    assert inventory["system"]["product"] == "fake machine"
    assert inventory["disks"] and all(d["empty"] for d in inventory["disks"])

    totals = [r["total"] for r in results.values()]
    print(
        f"\n  20 fakes on one interface: wall {wall:.2f} s (process start included); "
        f"per-machine flow median {statistics.median(totals):.3f} s, max {max(totals):.3f} s"
    )
    assert "metalseed.token=" not in proc.stdout.replace("metalseed.token=********", "")


@dataclasses.dataclass
class Racked:
    machines_file: Path
    ns: Netns

    @property
    def netns(self) -> str:
        return self.ns.name

    def addresses(self) -> str:
        return self.ns.ip("-4", "addr", "show", "eth0").stdout


@pytest.fixture
def racked(site) -> Iterator[Racked]:
    """A rack namespace; its rack process (started by the power hook) is stopped by PID."""
    rack = rack_namespace(site)
    racked = Racked(site.tmp / "fakes.json", rack)
    yield racked
    if racked.machines_file.exists():
        stop_rack(read_machines(racked.machines_file), rack.name)


def test_bmc_power_boots_fakes_through_the_hook_and_their_rack(
    site, racked, bmc_sim, addr_block, creds_file
):
    specs = fake_specs(site, 2, racked.netns)
    write_machines(racked.machines_file, site.tmp / "fakes", specs)
    hook = ("--power-hook", hook_command(racked.machines_file))
    nodes = discovered(site, bmc_sim, addr_block, creds_file, [s.uuid for s in specs], *hook)
    for node in nodes:
        cli("power", "on", node, state_dir=site.state)

    deadline = time.monotonic() + 60
    while {n["node"] for n in site.nodes() if n["state"] == "enlisted"} != set(nodes):
        assert time.monotonic() < deadline, site.nodes()
        time.sleep(0.3)
    machines = read_machines(racked.machines_file)
    pid = rack_pid(machines, racked.netns)
    assert pid is not None  # one rack process for the namespace, started by the first hook
    status = json.loads(
        subprocess.run(
            [sys.executable, "-m", "bootstrap.lab.fakemachine", "status"]
            + ["--machines", str(racked.machines_file), "--netns", racked.netns],
            capture_output=True, text=True, cwd=REPO, check=True,
        ).stdout
    )[racked.netns]  # fmt: skip
    assert all(m["power"] == "on" and m["enlisted"] for m in status.values()), status
    ip = status[specs[0].name]["ip"]
    assert f"{ip}/24" in racked.addresses()

    cli("power", "off", nodes[0], state_dir=site.state)
    deadline = time.monotonic() + 20
    while f"{ip}/24" in racked.addresses():
        assert time.monotonic() < deadline, "the powered-off fake kept its address"
        time.sleep(0.2)
    assert rack_pid(machines, racked.netns) == pid  # the other fake is still on, same rack
