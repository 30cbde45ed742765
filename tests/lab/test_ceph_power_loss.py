"""A whole-rack power loss: every machine, monitors included, off and on again through
its BMC, and the cluster comes back with its data.

Netbooted nodes are stateless, so a monitor's store must live on a disk: three netns
machines with two empty 8 GiB disks each join; each (a monitor host) gives its smallest
empty disk to its monitor's store (an ext4 filesystem labelled metalseed-mon) and the
other to an OSD. All three are powered off and on together; the seed re-joins the
monitor hosts (their monitors start from the stores on disk), the agents start the OSDs
from their disks, and the cluster is HEALTH_OK again with the same fsid and the RBD
image written before reads back byte-identical.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from tests.conftest import cli
from tests.lab.test_ceph_cluster import JOIN_TIMEOUT, CephLab, wait_for

pytestmark = [
    pytest.mark.root,
    pytest.mark.netns,
    pytest.mark.image,
    pytest.mark.ceph,
    pytest.mark.timeout(1500),
]

MACHINES = ("netns1", "netns2", "netns3")


@pytest.fixture
def lab(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    if shutil.which("systemd-nspawn") is None or shutil.which("ceph") is None:
        pytest.skip("systemd-nspawn (systemd-container) or ceph (ceph-common) missing")
    state = tmp_path / "state"
    lab = CephLab(state)
    try:
        cli("lab", "up", "--machines", "netns=3", "--disks", "2x8G", "--image", "node",
            state_dir=state, timeout=900)  # fmt: skip
        wait_for("3 machines active", lambda: lab.all_active(set(MACHINES)), JOIN_TIMEOUT)
        yield lab
    finally:
        if (state / "lab" / "lab.json").exists():
            cli("lab", "down", state_dir=state, check=False, timeout=300)


def healthy(lab: CephLab, osds: int):
    doc = lab.cluster_status()
    ok = doc["health"] == "HEALTH_OK" and doc["osds_up"] == osds == doc["osds_in"]
    return ok and doc["mons_in_quorum"] == 3 and doc


def test_the_cluster_survives_every_machine_losing_power(lab):
    before = wait_for("HEALTH_OK", lambda: healthy(lab, 3), 180)
    rows = lab.rows()
    for name in MACHINES:
        mount = lab.ssh(rows[name]["ip"], "findmnt -n -o FSTYPE /var/lib/ceph/mon").strip()
        assert mount == "ext4", f"{name}: the monitor store is on {mount or 'no disk'}"
    writer = rows["netns1"]["ip"]
    lab.ssh(writer, "head -c 16M /dev/urandom > /tmp/payload && rbd import /tmp/payload rbd/keep")
    want = lab.ssh(writer, "sha256sum < /tmp/payload").split()[0]

    nodes = [rows[name]["node"] for name in MACHINES]
    lab.metalseed("power", "off", *nodes)
    machines = lab.state / "lab" / "machines"
    # the power hook stops each machine's runner (an orderly container shutdown), then
    # removes its PID file
    wait_for(
        "every machine off",
        lambda: not any((machines / name / "runner.pid").exists() for name in MACHINES),
        180,
    )
    lab.metalseed("power", "on", *nodes)

    after = wait_for("HEALTH_OK after the power loss", lambda: healthy(lab, 3), 420, every=5)
    assert after["fsid"] == before["fsid"]
    assert lab.all_active(set(MACHINES))
    reader = lab.rows()["netns3"]["ip"]
    got = lab.ssh(reader, "rbd export rbd/keep - 2>/dev/null | sha256sum", timeout=180)
    assert got.split()[0] == want
    status = json.loads(lab.metalseed("cluster", "status", "--json").stdout)
    assert sorted(o for h in status["hosts"] for o in h["osds"]) == [0, 1, 2]  # no new OSDs
