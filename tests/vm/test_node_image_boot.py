"""The real node image, end to end: BMC power-on -> netboot -> systemd -> agent -> enlisted.

`metalseed lab up --machines qemu=1 --disks 1x2G --image node` builds (or takes
from the cache) the hardened node image, and the lab's seed daemon finds the
VM's simulated BMC, netboots it with real iPXE firmware, and the image's
initrd fetches and verifies the rootfs, switches to systemd, and the node
agent enlists with the machine's real inventory. Asserted: the node reaches
`enlisted` with no command after `lab up`, its inventory lists the VM's data
disk (size, empty) and NIC MAC, its DMI UUID is the BMC's GUID; the time from
power-on to enlisted is reported.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.conftest import cli

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.root,
    pytest.mark.netns,
    pytest.mark.image,
    pytest.mark.timeout(1500),
]

ENLIST_TIMEOUT = 600  # TCG: the whole of systemd under emulation; a loaded CI box is slower
DISK_MIB = 2048


def _report(capsys, text: str) -> None:
    with capsys.disabled():
        print(f"\n  {text}", flush=True)


@pytest.fixture
def lab(tmp_path, qemu_available):
    state = tmp_path / "state"
    yield state
    cli("lab", "down", state_dir=state, check=False, timeout=180)


def test_a_vm_netboots_the_node_image_and_enlists_with_its_inventory(lab, capsys):
    cli(
        "lab",
        "up",
        "--machines",
        "qemu=1",
        "--disks",
        f"1x{DISK_MIB}M",
        "--memory",
        "2048",
        "--image",
        "node",
        "--no-join",
        state_dir=lab,
        timeout=1200,
    )
    deadline = time.monotonic() + ENLIST_TIMEOUT
    row = None
    while time.monotonic() < deadline:
        [row] = json.loads(cli("lab", "status", "--json", state_dir=lab).stdout)["machines"]
        if row["state"] == "enlisted":
            break
        time.sleep(2)
    console = (lab / "lab" / "machines" / "qemu1.serial.log").read_text(errors="replace")
    assert row and row["state"] == "enlisted", f"{row}\n{console[-4000:]}"

    node = json.loads(cli("nodes", "show", row["node"], "--json", state_dir=lab).stdout)
    inventory = node["inventory"]
    assert row["mac"] in [nic["mac"] for nic in inventory["nics"]]
    data = [d for d in inventory["disks"] if d["size_bytes"] == DISK_MIB * 2**20]
    assert data and data[0]["empty"] is True, inventory["disks"]
    assert inventory["system"]["uuid"].lower() == node["guid"].lower()

    events = json.loads(
        cli("events", row["node"], "--json", "--limit", "500", state_dir=lab).stdout
    )
    events.sort(key=lambda e: e["id"])
    powered = next(e["ts"] for e in events if "netboot attempt 1" in e["message"])
    enlisted = next(e["ts"] for e in events if e["data"].get("to") == "enlisted")
    kinds = [e["kind"] for e in events]
    assert "http.script" in kinds and "http.file" in kinds
    rootfs = [e for e in events if e["kind"] == "http.file" and "rootfs" in e["message"]]
    assert rootfs, kinds  # the initrd fetched the rootfs from the seed
    _report(
        capsys,
        f"node image: power-on -> enlisted {enlisted - powered:.1f} s "
        f"(rootfs {rootfs[0]['message']})",
    )
