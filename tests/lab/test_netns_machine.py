"""netns machines: the real node image netboots in a namespace and enlists.

`lab up` racks netns machines; the lab's seed finds their BMCs, powers them
on, and each machine's runner netboots with the firmware emulator, mounts the
downloaded squashfs under an overlay and boots it with systemd-nspawn. The
image's own agent enlists with its loop-device disks and its NIC. After `lab
down` (also after a killed runner) no namespace, loop device, mount or
process of the lab remains.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import cli
from tests.lab.conftest import lab_namespaces, processes_mentioning

pytestmark = [pytest.mark.root, pytest.mark.netns, pytest.mark.image]

ENLIST_TIMEOUT = 300


def _loops_under(path: Path) -> list[str]:
    out = subprocess.run(["losetup", "-J"], capture_output=True, text=True).stdout
    devices = json.loads(out)["loopdevices"] if out.strip() else []
    return [d["name"] for d in devices if (d.get("back-file") or "").startswith(str(path))]


def _mounts_under(path: Path) -> list[str]:
    lines = Path("/proc/mounts").read_text().splitlines()
    return [line.split()[1] for line in lines if line.split()[1].startswith(str(path))]


def _wait_enlisted(state: Path, names: set[str], timeout: float = ENLIST_TIMEOUT) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = json.loads(cli("lab", "status", "--json", state_dir=state).stdout)
        rows = {r["machine"]: r for r in status["machines"] if r["machine"] in names}
        if all(r["state"] == "enlisted" for r in rows.values()) and len(rows) == len(names):
            return status
        if time.monotonic() > deadline:
            logs = ""
            for name in names:
                runner = state / "lab" / "machines" / name / "runner.log"
                logs += f"\n{name}: " + (runner.read_text()[-1500:] if runner.exists() else "")
            raise AssertionError(f"not enlisted: {rows}{logs}")
        time.sleep(1)


def _assert_nothing_left(state: Path, lab_id: str) -> None:
    lab_dir = state / "lab"
    assert lab_namespaces(lab_id) == []
    assert _loops_under(lab_dir) == []
    assert _mounts_under(lab_dir) == []
    assert processes_mentioning(str(lab_dir)) == []


@pytest.fixture
def lab_state(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    if shutil.which("systemd-nspawn") is None:
        pytest.skip("systemd-nspawn is not installed (systemd-container)")
    state = tmp_path / "state"
    yield state
    if (state / "lab" / "lab.json").exists():
        cli("lab", "down", state_dir=state, check=False, timeout=300)


def _up(state: Path, *machines: str, extra: tuple[str, ...] = ()) -> None:
    argv = ["lab", "up", *(a for m in machines for a in ("--machines", m))]
    cli(
        *argv,
        "--disks",
        "1x1G",
        "--image",
        "node",
        "--no-join",
        *extra,
        state_dir=state,
        timeout=900,
    )


def test_a_netns_machine_boots_the_node_image_and_enlists_its_disk_and_nic(lab_state):
    _up(lab_state, "netns=1")
    status = _wait_enlisted(lab_state, {"netns1"})
    lab_id = status["lab"]
    [row] = status["machines"]
    assert row["power"] == "on" and row["kind"] == "netns"
    shown = json.loads(cli("nodes", "show", row["node"], "--json", state_dir=lab_state).stdout)
    inventory = shown["inventory"]
    [disk] = inventory["disks"]
    assert disk["name"].startswith("loop") and disk["size_bytes"] == 1 << 30
    assert disk["empty"] is True
    assert [n["mac"] for n in inventory["nics"]] == [row["mac"]]
    assert inventory["system"]["vendor"] == "metalseed-lab"

    cli("lab", "down", state_dir=lab_state, timeout=300)
    _assert_nothing_left(lab_state, lab_id)


def test_lab_down_after_a_killed_runner_leaves_nothing(lab_state):
    _up(lab_state, "netns=1")
    status = _wait_enlisted(lab_state, {"netns1"})
    machine_dir = lab_state / "lab" / "machines" / "netns1"
    os.kill(int((machine_dir / "runner.pid").read_text()), signal.SIGKILL)
    time.sleep(0.5)
    assert _loops_under(lab_state / "lab"), "the killed runner left its disk attached"

    cli("lab", "down", state_dir=lab_state, timeout=300)
    _assert_nothing_left(lab_state, status["lab"])


@pytest.mark.qemu
def test_a_mixed_lab_of_netns_and_qemu_machines_all_enlist(lab_state, qemu_available):
    _up(lab_state, "netns=2", "qemu=1", extra=("--memory", "2048"))
    status = _wait_enlisted(lab_state, {"netns1", "netns2", "qemu1"}, timeout=600)
    nodes = json.loads(cli("nodes", "list", "--json", state_dir=lab_state).stdout)
    assert len(nodes) == 3 and len({n["guid"] for n in nodes}) == 3

    cli("lab", "down", state_dir=lab_state, timeout=300)
    _assert_nothing_left(lab_state, status["lab"])
