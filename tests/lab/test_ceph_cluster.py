"""The join on real machines: netns machines boot the image, enlist and become a Ceph cluster.

One lab for the module (its tests run in order, each building on the last):
three netns machines with a 10 GiB data disk each are found over IPMI,
netbooted, enlisted and joined by the lab's seed with no command; then

* the cluster is HEALTH_OK with 3 monitors in quorum, 3 OSDs up and in and
  3 CRUSH hosts, as the ``ceph`` CLI (run in the seed's namespace) says;
* no cephx key is in the seed's log, its join directories or its store in clear;
* the join's SSH checked each node's host key (reported at its enlist);
* an RBD image written on one machine reads back byte-identical on another;
* a 4th machine racked later joins on its own and raw capacity grows by at
  least 95% of its disk; ``cluster status`` lists it;
* powering it off through its BMC keeps the data readable and the cluster
  reports the host down; powering it on brings the same OSD back with no join;
* a join with a broken role fails the node with the task in the reason; the
  re-run with the real roles makes it active again.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import cli

pytestmark = [
    pytest.mark.root,
    pytest.mark.netns,
    pytest.mark.image,
    pytest.mark.ceph,
    pytest.mark.timeout(1200),  # the module's lab (image build on a cold cache) in the first
]

GIB = 1 << 30
DISK = "1x10G"
JOIN_TIMEOUT = 420.0
REPO = Path(__file__).resolve().parents[2]


def wait_for(what: str, check: Callable[[], object], timeout: float, every: float = 2.0):
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (subprocess.CalledProcessError, json.JSONDecodeError, KeyError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; last: {last!r}")


class CephLab:
    def __init__(self, state: Path) -> None:
        self.state = state
        self.tmp = state / "test"
        self.tmp.mkdir(parents=True, exist_ok=True, mode=0o700)

    def status(self) -> dict:
        return json.loads(cli("lab", "status", "--json", state_dir=self.state).stdout)

    def rows(self) -> dict[str, dict]:
        return {r["machine"]: r for r in self.status()["machines"]}

    @property
    def seed_ns(self) -> str:
        return f"msl{self.status()['lab']}-seed"

    def in_seed(self, *argv: str, check: bool = True, timeout: float = 120, **kw):
        return subprocess.run(
            ["ip", "netns", "exec", self.seed_ns, *argv],
            capture_output=True, text=True, check=check, timeout=timeout, **kw,
        )  # fmt: skip

    def metalseed(self, *argv: str, check: bool = True, env: dict | None = None, timeout=600):
        python = str(REPO / ".venv" / "bin" / "python")
        config = str(self.state / "lab" / "seed.toml")
        return self.in_seed(
            "env", *(f"{k}={v}" for k, v in (env or {}).items()),
            python, "-m", "bootstrap", "--config", config, *argv,
            check=check, timeout=timeout, cwd=REPO,
        )  # fmt: skip

    def cluster_status(self) -> dict:
        return json.loads(self.metalseed("cluster", "status", "--json").stdout)

    def admin_keyring(self) -> Path:
        """The admin key, out of the store into a 0600 file of this test (for the ceph CLI)."""
        path = self.tmp / "admin.keyring"
        if not path.exists():
            store = self.store()
            key = store.cluster_secret("admin_key").reveal()
            store.close()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(f"[client.admin]\n\tkey = {key}\n")
        return path

    def store(self):
        from bootstrap.secretbox import SecretBox
        from bootstrap.store.sqlite import SqliteStore

        return SqliteStore(self.state / "state.db", SecretBox(self.state / "secret.key"))

    def ceph(self, *argv: str, fmt_json: bool = True):
        """The ``ceph`` CLI in the seed's namespace, with the seed's own client conf."""
        from bootstrap.join.cluster import identity

        store = self.store()
        conf = self.tmp / "ceph.conf"
        conf.write_text(identity(store).conf())
        store.close()
        out = self.in_seed(
            "ceph", "-c", str(conf), "-k", str(self.admin_keyring()), "--name", "client.admin",
            "--connect-timeout", "15", *argv, *(["--format", "json"] if fmt_json else []),
        ).stdout  # fmt: skip
        return json.loads(out) if fmt_json else out

    def ssh(self, ip: str, command: str, timeout: float = 120) -> str:
        key = self.state / "ssh" / "id_ed25519"
        return self.in_seed(
            "ssh", "-i", str(key), "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
            "-o", "ConnectTimeout=10", f"root@{ip}", command, timeout=timeout,
        ).stdout  # fmt: skip

    def node_row(self, machine: str) -> dict:
        return self.rows()[machine]

    def events(self, node: str) -> list[dict]:
        return json.loads(
            cli("events", node, "--json", "--limit", "500", state_dir=self.state).stdout
        )

    def wait_osd(self, osd: int, status: str, timeout: float) -> None:
        def reached() -> bool:
            nodes = self.ceph("osd", "tree")["nodes"]
            return any(n["id"] == osd and n["status"] == status for n in nodes)

        wait_for(f"osd.{osd} {status}", reached, timeout)

    def all_active(self, names: set[str]) -> bool:
        rows = self.rows()
        failed = [r for r in rows.values() if r["state"] == "failed"]
        if failed:
            nodes = json.loads(cli("nodes", "list", "--json", state_dir=self.state).stdout)
            reasons = {n["node"]: n.get("reason") for n in nodes if n["state"] == "failed"}
            raise AssertionError(f"a machine failed: {reasons}")
        return all(rows.get(n, {}).get("state") == "active" for n in names)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    if shutil.which("systemd-nspawn") is None or shutil.which("ceph") is None:
        pytest.skip("systemd-nspawn (systemd-container) or ceph (ceph-common) missing")
    state = tmp_path_factory.mktemp("ceph") / "state"
    lab = CephLab(state)
    try:
        cli("lab", "up", "--machines", "netns=3", "--disks", DISK, "--image", "node",
            state_dir=state, timeout=900)  # fmt: skip
        wait_for("3 machines active", lambda: lab.all_active({"netns1", "netns2", "netns3"}),
                 JOIN_TIMEOUT)  # fmt: skip
        yield lab
    finally:
        if (state / "lab" / "lab.json").exists():
            cli("lab", "down", state_dir=state, check=False, timeout=300)


def test_three_machines_form_a_healthy_cluster(lab):
    health = wait_for("HEALTH_OK", lambda: lab.ceph("health")["status"] == "HEALTH_OK" or None, 180)
    assert health
    quorum = lab.ceph("quorum_status")
    assert len(quorum["quorum_names"]) == 3
    stat = lab.ceph("osd", "stat")
    assert (stat["num_osds"], stat["num_up_osds"], stat["num_in_osds"]) == (3, 3, 3)
    hosts = [n for n in lab.ceph("osd", "tree")["nodes"] if n["type"] == "host"]
    nodes = {r["node"] for r in lab.rows().values()}
    assert {h["name"] for h in hosts} == nodes
    pools = {p["pool_name"]: p for p in lab.ceph("osd", "pool", "ls", "detail")}
    for name in ("metalseed", "rbd"):
        assert (pools[name]["size"], pools[name]["min_size"]) == (3, 2)


def test_no_key_is_anywhere_in_clear(lab):
    store = lab.store()
    keys = [store.cluster_secret(n).reveal() for n in ("mon_key", "admin_key", "bootstrap_osd_key")]
    store.close()
    places = [p for p in (lab.state / "join").rglob("*") if p.is_file()]
    places += [lab.state / "lab" / "seed.log", lab.state / "state.db"]
    places += list(lab.state.glob("state.db-*"))
    assert len(places) > 5
    for path in places:
        data = path.read_bytes()
        for key in keys:
            assert key.encode() not in data, f"a cephx key in clear in {path}"


def test_the_join_checked_each_nodes_host_key(lab):
    runs = sorted(p for p in (lab.state / "join").iterdir() if p.is_dir())
    pinned = (runs[0] / "known_hosts").read_text().splitlines()
    rows = lab.rows()
    assert {line.split(",")[0] for line in pinned} >= {r["ip"] for r in rows.values()}
    hosts = json.loads(next(runs[0].glob("inventory/hosts.json")).read_text())["all"]["hosts"]
    assert all("StrictHostKeyChecking=yes" in h["ansible_ssh_common_args"] for h in hosts.values())
    # and the pinned key is the node's: a strict login with only that file works
    key = lab.state / "ssh" / "id_ed25519"
    out = lab.in_seed(
        "ssh", "-i", str(key), "-o", "StrictHostKeyChecking=yes",
        "-o", f"UserKnownHostsFile={runs[0] / 'known_hosts'}", "-o", "LogLevel=ERROR",
        f"root@{rows['netns1']['ip']}", "hostname",
    ).stdout  # fmt: skip
    assert out.strip() == rows["netns1"]["node"]


def test_an_rbd_image_written_on_one_machine_reads_back_on_another(lab):
    rows = lab.rows()
    writer, reader = rows["netns1"]["ip"], rows["netns3"]["ip"]
    lab.ssh(
        writer, "head -c 16M /dev/urandom > /tmp/payload && rbd import /tmp/payload rbd/ms-test"
    )
    written = lab.ssh(writer, "sha256sum < /tmp/payload").split()[0]
    read = lab.ssh(reader, "rbd export rbd/ms-test - 2>/dev/null | sha256sum").split()[0]
    assert read == written and len(written) == 64


def test_a_fourth_machine_joins_with_no_command(lab):
    before = lab.cluster_status()
    cli("lab", "up", "--machines", "netns=1", "--disks", DISK, state_dir=lab.state, timeout=300)
    wait_for("netns4 active", lambda: lab.all_active({"netns4"}), JOIN_TIMEOUT)
    after = wait_for(
        "4 OSDs up and in",
        lambda: (s := lab.cluster_status())["osds_up"] == 4 and s["osds_in"] == 4 and s,
        120,
    )

    def grown() -> dict | None:
        # a new OSD's size reaches the capacity figures with its first stats report to
        # the manager (every few seconds), a little after it is up and in
        s = lab.cluster_status()
        return s if s["raw_bytes"] - before["raw_bytes"] >= 0.95 * 10 * GIB else None

    after = wait_for(f"raw capacity to grow from {before['raw_bytes']} B", grown, 60)
    node = lab.node_row("netns4")["node"]
    hosts = {h["host"]: h for h in after["hosts"]}
    assert hosts[node]["raw_bytes"] >= 0.95 * 10 * GIB and len(hosts[node]["osds"]) == 1
    assert node in lab.metalseed("cluster", "status").stdout


def test_power_off_keeps_data_and_power_on_brings_the_osd_back(lab):
    node = lab.node_row("netns4")["node"]
    osd = {h["host"]: h for h in lab.cluster_status()["hosts"]}[node]["osds"][0]
    reader = lab.node_row("netns2")["ip"]
    want = lab.ssh(reader, "rbd export rbd/ms-test - 2>/dev/null | sha256sum").split()[0]
    lab.metalseed("power", "off", node)
    lab.wait_osd(osd, "down", 120)
    checks = lab.ceph("health", "detail")["checks"]
    assert "OSD_HOST_DOWN" in checks or "OSD_DOWN" in checks, checks
    got = lab.ssh(reader, "rbd export rbd/ms-test - 2>/dev/null | sha256sum", timeout=180)
    assert got.split()[0] == want
    events_before = len(lab.events(node))
    lab.metalseed("power", "on", node)
    lab.wait_osd(osd, "up", 240)
    assert lab.node_row("netns4")["state"] == "active"
    later = lab.events(node)[events_before:]
    assert not [e for e in later if e.get("kind") == "state" and "joining" in e["message"]], later
    assert lab.cluster_status()["osds"] == 4  # the same OSD, no new one


def test_a_broken_role_fails_the_node_and_a_rerun_fixes_it(lab, tmp_path):
    node = lab.node_row("netns4")["node"]
    broken = tmp_path / "roles"
    shutil.copytree(REPO / "roles", broken)
    tasks = broken / "ceph_osd" / "tasks" / "main.yml"
    tasks.write_text(
        tasks.read_text()
        + "\n- name: Injected failure\n  ansible.builtin.fail:\n    msg: injected by the test\n"
    )
    run = lab.metalseed(
        "cluster", "join", node, check=False, env={"METALSEED_JOIN_ROLES_DIR": str(broken)}
    )
    assert run.returncode != 0, run.stdout + run.stderr
    row = json.loads(cli("nodes", "show", node, "--json", state_dir=lab.state).stdout)
    assert row["state"] == "failed"
    assert "Injected failure" in row["reason"] and node in row["reason"], row["reason"]
    run = lab.metalseed("cluster", "join", node, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    row = json.loads(cli("nodes", "show", node, "--json", state_dir=lab.state).stdout)
    assert row["state"] == "active", row
    assert lab.cluster_status()["osds_up"] == 4
