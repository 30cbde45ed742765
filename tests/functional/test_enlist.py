"""Enlist over real HTTP: ``metalseed serve`` in a namespace, curl and the real agent.

A provisioning segment in network namespaces: the seed (``prov0``,
10.98.0.1/24) runs ``metalseed serve`` in proxy mode; each machine is a
namespace on the same bridge. A machine fetches its iPXE script with curl, as
iPXE would, and the kernel arguments in it become the command line of the
real node agent -- copied out of the tree as the image gets it and run by
Debian's ``/usr/bin/python3`` inside the machine's namespace, so it reads the
namespace's real ``/sys``. Its other roots are confined to ``tmp_path``: DMI
and ``/proc`` are fixtures, its disks are two real loop
devices (one blank, one holding ext4), and ``nft``, ``chronyc``,
``hostnamectl`` and ``lldpcli`` are stand-ins that record their arguments.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from bootstrap.boot.backend import token_hash
from bootstrap.image.catalogue import Catalogue
from bootstrap.models import BmcAddress
from bootstrap.secretbox import SecretBox
from bootstrap.states import NodeState
from bootstrap.store.sqlite import SqliteStore
from tests.conftest import REPO, cli, start_serve, stop_process

pytestmark = [
    pytest.mark.root,
    pytest.mark.netns,
    pytest.mark.peer,
    pytest.mark.skipif(not shutil.which("curl"), reason="needs curl"),
    pytest.mark.skipif(not shutil.which("losetup"), reason="needs losetup"),
    pytest.mark.skipif(not Path("/usr/bin/python3").exists(), reason="needs Debian's python3"),
]

NET = "10.98.0"
SEED_IP = f"{NET}.1"
PORT = 8080
URL = f"http://{SEED_IP}:{PORT}"
GUID, GUID2 = "6f1c3e2a-58d4-4b7e-9a15-2c7d0e8b4f93", "3d2e1f0a-9b8c-4d7e-8f6a-5b4c3d2e1f0a"
KNOWN_MAC, UNKNOWN_MAC, THIRD_MAC = "52:54:00:98:00:01", "52:54:00:98:00:02", "52:54:00:98:00:03"
PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
FAKE_TOOL = '#!/bin/sh\necho "$(basename "$0") $*" >> "$FAKE_LOG"\n'
LLDP = {"lldp": {"interface": {"eth0": {"chassis": {"tor-1": {"id": {"value": "00:aa"}}}}}}}


class Site:
    """The seed's state, ``metalseed serve`` in its namespace, and machine namespaces."""

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
        store = self.store()
        self.node = store.create_node(
            guid=GUID, bmc=BmcAddress("127.0.0.9"), state=NodeState.ENROLLED
        ).id
        self.node2 = store.create_node(
            guid=GUID2, bmc=BmcAddress("127.0.0.10"), state=NodeState.ENROLLED
        ).id
        store.close()
        src = tmp_path / "image"
        src.mkdir()
        for name in ("vmlinuz", "initrd"):
            (src / name).write_bytes(b"not really a " + name.encode())
        Catalogue(self.state / "images").add(
            "test-1",
            {n: src / n for n in ("vmlinuz", "initrd")},
            cmdline="console=ttyS0",
            make_current=True,
        )

    def store(self) -> SqliteStore:
        return SqliteStore(self.state / "state.db", SecretBox(self.state / "secret.key"))

    def start(self) -> None:
        args = ["--interface", "prov0", "--mode", "proxy", "--http-port", str(PORT), "--no-ra"]
        self.serve = start_serve(self.seed, self.state, args, self.log)

    def stop(self) -> None:
        if self.serve is not None:
            stop_process(self.serve)

    def machine(self, mac: str):
        self.machines += 1
        ns = self.lab.namespace(f"m{self.machines}")
        address = f"{NET}.{50 + self.machines}/24"
        self.lab.link(self.switch, self.bridge, ns, "eth0", mac=mac, address=address)
        return ns

    def show(self, node: str) -> dict:
        return json.loads(cli("nodes", "show", node, "--json", state_dir=self.state).stdout)


@pytest.fixture
def site(netlab, tmp_path: Path) -> Iterator[Site]:
    site = Site(netlab, tmp_path)
    site.start()
    yield site
    site.stop()
    assert "metalseed.token" not in site.log.read_text()


@pytest.fixture
def disks(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """Two loop devices: a blank one and one with ext4 on it; detached afterwards."""
    names = []
    try:
        for i, fs in enumerate((False, True)):
            backing = tmp_path / f"disk{i}.img"
            with backing.open("wb") as fh:
                fh.truncate(32 * 1024 * 1024)
            if fs:
                subprocess.run(["mkfs.ext4", "-q", "-F", str(backing)], check=True)
            dev = subprocess.run(
                ["losetup", "-f", "--show", str(backing)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            names.append(dev)
        yield tuple(Path(n).name for n in names)  # type: ignore[misc]
    finally:
        for dev in names:
            subprocess.run(["losetup", "-d", dev], check=False)


def curl(ns, url: str, *args: str, data: bytes | None = None) -> tuple[int, str]:
    """curl inside a namespace; (status, body)."""
    argv = ["curl", "-sS", "-w", "\n%{http_code}", *args, url]
    proc = ns.run(argv, input=data, capture_output=True, timeout=30, text=False)
    body, _, code = proc.stdout.rpartition(b"\n")
    return int(code), body.decode()


def kernel_args(ns, mac: str, uuid_: str | None = None) -> str:
    """What iPXE would boot the kernel with: the script's kernel line, minus the URL."""
    query = f"?uuid={uuid_}" if uuid_ else ""
    status, script = curl(ns, f"{URL}/boot/{mac.replace(':', '-')}.ipxe{query}")
    assert status == 200, script
    [line] = [line for line in script.splitlines() if line.startswith("kernel ")]
    return " ".join(w for w in line.split() if "=" in w and not w.startswith("http"))


def token_of(args: str) -> str:
    return args.split("metalseed.token=")[1].split()[0]


class Agent:
    """The real agent, as the image holds it, with roots under one directory."""

    def __init__(self, base: Path, disks: tuple[str, str], *, dmi: str = GUID) -> None:
        self.base = base
        self.disks = disks
        lib = base / "usr/lib/metalseed"
        (lib / "bootstrap/agent").mkdir(parents=True)
        shutil.copy(REPO / "bootstrap/__init__.py", lib / "bootstrap")
        for source in (REPO / "bootstrap/agent").glob("*.py"):
            shutil.copy(source, lib / "bootstrap/agent")
        self.lib = lib
        self.dmi = base / "dmi"  # the rest of /sys is the real one, as the namespace sees it
        self.dmi.mkdir()
        for name, value in (("product_uuid", dmi), ("sys_vendor", "metalseed lab")):
            (self.dmi / name).write_text(value + "\n")
        self.proc = base / "proc"
        (self.proc / "sys/kernel/random").mkdir(parents=True)
        for name in ("cpuinfo", "meminfo"):
            (self.proc / name).write_text(Path("/proc", name).read_text())
        self.bin = base / "bin"
        self.bin.mkdir()
        for tool in ("nft", "chronyc", "hostnamectl", "lldpcli"):
            text = FAKE_TOOL + (f"echo '{json.dumps(LLDP)}'\n" if tool == "lldpcli" else "")
            (self.bin / tool).write_text(text)
            (self.bin / tool).chmod(0o755)
        self.ran = base / "ran.log"
        self.root = base / "root"

    def run(self, ns, args: str, boot_id: str) -> subprocess.CompletedProcess:
        (self.base / "cmdline").write_text(args + "\n")
        (self.proc / "sys/kernel/random/boot_id").write_text(boot_id + "\n")
        argv = [
            "/usr/bin/python3",
            "-m",
            "bootstrap.agent",
            "--cmdline",
            str(self.base / "cmdline"),
        ]
        argv += ["--root", str(self.root), "--dmi-dir", str(self.dmi)]
        argv += ["--proc-root", str(self.proc), "--disks", ",".join(self.disks)]
        argv += ["--commands", "run", "--attempts", "3", "--backoff", "0.2"]
        env = {"PATH": f"{self.bin}:{PATH}", "FAKE_LOG": str(self.ran), "LANG": "C.UTF-8"}
        return ns.run(argv, cwd=self.lib, env=env, timeout=120)


def post(ns, body: bytes | dict, *headers: str) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    args = ["-X", "POST", "-H", "Content-Type: application/json", "--data-binary", "@-"]
    for header in headers:
        args += ["-H", header]
    status, text = curl(ns, f"{URL}/api/v1/enlist", *args, data=data)
    return status, json.loads(text) if text else {}


def state_moves(shown: dict) -> list[tuple[str, str]]:
    return [(e["data"]["from"], e["data"]["to"]) for e in shown["events"] if "from" in e["data"]]


def kinds(shown: dict, kind: str) -> list[dict]:
    return [e for e in shown["events"] if e["kind"] == kind]


def an_enlist_body(mac: str, node: str | None, boot_id: str) -> dict:
    inventory = {"system": {"uuid": GUID}, "cpus": {"count": 1}, "memory": {"bytes": 1}}
    return {"mac": mac, "node": node, "boot_id": boot_id, "inventory": inventory}


# -- the tests ----------------------------------------------------------------------------------


def test_a_known_node_enlists_with_the_real_agent(site, disks, tmp_path):
    machine = site.machine(KNOWN_MAC)
    args = kernel_args(machine, KNOWN_MAC, GUID)
    assert f"metalseed.node={site.node}" in args and f"metalseed.mac={KNOWN_MAC}" in args
    agent = Agent(tmp_path / "agent", disks)
    boot_id = str(uuid.uuid4())
    started = time.monotonic()
    proc = agent.run(machine, args, boot_id)
    took = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    assert token_of(args) not in proc.stderr + proc.stdout

    # what the answer changed on the "node"
    public = (site.state / "ssh/id_ed25519.pub").read_text().strip()
    keys = agent.root / "root/.ssh/authorized_keys"
    assert public in keys.read_text().splitlines() and keys.stat().st_mode & 0o777 == 0o600
    sources = agent.root / "run/metalseed/chrony/metalseed.sources"
    assert sources.read_text() == f"server {SEED_IP} iburst\n"
    answer = json.loads((agent.root / "run/metalseed/enlist.json").read_text())
    assert answer == {
        "node": site.node,
        "state": "enlisted",
        "ssh_authorized_keys": [public],
        "time_servers": [SEED_IP],
        "provisioning_cidr": f"{NET}.0/24",
        "hostname": site.node,
    }
    assert agent.ran.read_text().splitlines() == [
        "lldpcli -f json show neighbors",
        "chronyc reload sources",
        f"nft add element inet metalseed provisioning {{ {NET}.0/24 }}",
        f"hostnamectl set-hostname {site.node}",
    ]

    # what the seed knows now
    shown = site.show(site.node)
    assert shown["state"] == "enlisted"
    assert state_moves(shown) == [("enrolled", "booting"), ("booting", "enlisted")]
    inventory = shown["inventory"]
    assert (inventory["mac"], inventory["boot_id"]) == (KNOWN_MAC, boot_id)
    assert inventory["system"]["uuid"] == GUID
    blank, ext4 = disks
    by_name = {d["name"]: d for d in inventory["disks"]}
    assert set(by_name) == {blank, ext4}
    assert (by_name[blank]["empty"], by_name[blank]["size_bytes"]) == (True, 32 * 2**20)
    assert (by_name[ext4]["empty"], by_name[ext4]["signature"]) == (False, "ext4")
    assert [(n["name"], n["mac"], n["link"]) for n in inventory["nics"]] == [
        ("eth0", KNOWN_MAC, "up")
    ]
    assert inventory["lldp"][0]["chassis_name"] == "tor-1"
    assert inventory["cpus"]["count"] >= 1 and inventory["memory"]["bytes"] > 0
    text = cli("nodes", "show", site.node, state_dir=site.state).stdout
    assert blank in text and ext4 in text and KNOWN_MAC in text and "ext4" in text
    print(f"\n  agent: kernel command line -> enlisted in {took:.2f} s")

    # the same boot again (systemd restarted the unit): the same answer, nothing new
    events = len(shown["events"])
    (agent.root / "run/metalseed/enlist.json").unlink()
    assert agent.run(machine, args, boot_id).returncode == 0
    assert json.loads((agent.root / "run/metalseed/enlist.json").read_text()) == answer
    assert len(site.show(site.node)["events"]) == events

    # the token replayed by another boot: refused, with an event, and the node unchanged
    replay = agent.run(machine, args, str(uuid.uuid4()))
    assert replay.returncode == 77, replay.stderr
    assert "replay" in replay.stderr
    after = site.show(site.node)
    assert after["state"] == "enlisted" and after["inventory"]["boot_id"] == boot_id
    [refused] = kinds(after, "enlist.refused")
    assert refused["data"]["code"] == "replay" and refused["data"]["mac"] == KNOWN_MAC


def test_missing_wrong_and_expired_tokens_are_refused_with_events(site):
    machine = site.machine(KNOWN_MAC)
    token = token_of(kernel_args(machine, KNOWN_MAC, GUID))
    boot_id = str(uuid.uuid4())
    body = an_enlist_body(KNOWN_MAC, site.node, boot_id)
    auth = f"Authorization: Bearer {token}"

    status, reply = post(machine, body)
    assert status == 401 and "token" in reply["error"]
    assert post(machine, body, "Authorization: Bearer not-the-token")[0] == 401
    assert post(machine, body, f"Authorization: Basic {token}")[0] == 401
    status, reply = post(machine, {**body, "mac": UNKNOWN_MAC}, auth)
    assert status == 403 and "another MAC" in reply["error"]
    status, _ = post(machine, {**body, "node": site.node2}, auth)
    assert status == 403

    db = sqlite3.connect(site.state / "state.db")  # the token runs out
    db.execute("UPDATE tokens SET expires=1 WHERE hash=?", (token_hash(token),))
    db.commit()
    db.close()
    status, reply = post(machine, body, auth)
    assert status == 401 and "expired" in reply["error"]

    shown = site.show(site.node)
    codes = [e["data"]["code"] for e in kinds(shown, "enlist.refused")]
    assert codes == [
        "no_token",
        "unknown_token",
        "no_token",  # Basic is no Bearer token
        "wrong_mac",
        "wrong_node",
        "expired",
    ]
    assert shown["state"] == "booting" and shown["inventory"] is None  # the script's step only
    assert token not in json.dumps(shown)


def test_malformed_and_oversized_bodies_change_nothing(site, disks, tmp_path):
    machine = site.machine(KNOWN_MAC)
    args = kernel_args(machine, KNOWN_MAC, GUID)
    auth = f"Authorization: Bearer {token_of(args)}"
    before = site.show(site.node)
    good = an_enlist_body(KNOWN_MAC, site.node, str(uuid.uuid4()))
    bad_types = {**good, "inventory": {**good["inventory"], "disks": "sda"}}
    huge = {**good, "inventory": {**good["inventory"], "pad": "x" * 300_000}}
    for data in (b"{not json", b"[]", json.dumps(bad_types).encode(), json.dumps(huge).encode()):
        status, reply = post(machine, data, auth)
        assert status == 400, (data[:50], reply)
    status, reply = post(machine, json.dumps(huge).encode(), auth, "Transfer-Encoding: chunked")
    assert status == 400 and "larger than" in reply["error"]
    assert site.show(site.node) == before  # not an event more

    proc = Agent(tmp_path / "agent", disks).run(machine, args, str(uuid.uuid4()))
    assert proc.returncode == 0, proc.stderr  # the token was not used up by the junk
    assert site.show(site.node)["state"] == "enlisted"


def test_unknown_machines_are_discovered_once(site, disks, tmp_path):
    nodes_before = {
        n["node"] for n in json.loads(cli("nodes", "list", "--json", state_dir=site.state).stdout)
    }
    machine = site.machine(UNKNOWN_MAC)
    args = kernel_args(machine, UNKNOWN_MAC)  # firmware that sends no UUID: unknown
    assert "metalseed.mode=enlist" in args and "metalseed.node=" not in args
    assert "metalseed.token=" in args  # the discovery token
    new_guid = str(uuid.uuid4())
    proc = Agent(tmp_path / "a1", disks, dmi=new_guid).run(machine, args, str(uuid.uuid4()))
    assert proc.returncode == 0, proc.stderr
    listed = json.loads(cli("nodes", "list", "--json", state_dir=site.state).stdout)
    [new] = [n for n in listed if n["node"] not in nodes_before]
    assert (new["guid"], new["state"], new["bmc"]) == (new_guid, "enlisted", None)
    shown = site.show(new["node"])
    assert shown["inventory"]["nics"][0]["mac"] == UNKNOWN_MAC
    assert state_moves(shown) == [("booting", "enlisted")]
    answer = json.loads((tmp_path / "a1/root/run/metalseed/enlist.json").read_text())
    assert answer["node"] == answer["hostname"] == new["node"]

    # an unknown MAC of a machine known by its BMC: that node, not a new one
    third = site.machine(THIRD_MAC)
    args = kernel_args(third, THIRD_MAC)
    assert "metalseed.mode=enlist" in args
    proc = Agent(tmp_path / "a2", disks, dmi=GUID2).run(third, args, str(uuid.uuid4()))
    assert proc.returncode == 0, proc.stderr
    listed = json.loads(cli("nodes", "list", "--json", state_dir=site.state).stdout)
    assert len(listed) == len(nodes_before) + 1
    shown = site.show(site.node2)
    assert shown["state"] == "enlisted" and shown["inventory"]["mac"] == THIRD_MAC
