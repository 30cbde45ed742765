"""`metalseed lab up|down|status`: a rack in namespaces, found and booted by its own seed.

QEMU machines with real iPXE firmware boot the call-back image here (the node
image has its own tests). What is asserted: the seed daemon the lab starts
finds each machine's BMC on the BMC segment, netboots it with no further
command, a machine added to a running lab is found too, and `lab down`
leaves no namespace, process or QEMU behind -- also after `lab up` was
killed halfway.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, cli
from tests.lab.conftest import lab_namespaces, processes_mentioning

pytestmark = [pytest.mark.root, pytest.mark.netns]

TIMEOUT = 150


def _status(state: Path) -> dict:
    return json.loads(cli("lab", "status", "--json", state_dir=state).stdout)


def _wait_machines(state: Path, names: set[str], timeout: float = TIMEOUT) -> dict:
    """Until every named machine's node has called home; returns the last status."""
    deadline = time.monotonic() + timeout
    while True:
        status = _status(state)
        done = set()
        for row in status["machines"]:
            if row["machine"] in names and row["node"]:
                events = json.loads(
                    cli("events", row["node"], "--json", "--limit", "300", state_dir=state).stdout
                )
                if any(e["kind"] == "boot.callback" for e in events):
                    done.add(row["machine"])
        if done == names:
            return status
        if time.monotonic() > deadline:
            seed_log = (state / "lab" / "seed.log").read_text()[-3000:]
            raise AssertionError(f"not called home: {names - done}\n{status}\n{seed_log}")
        time.sleep(1)


@pytest.fixture
def lab_state(tmp_path, qemu_available):
    state = tmp_path / "state"
    yield state
    if (state / "lab" / "lab.json").exists():
        cli("lab", "down", state_dir=state, check=False, timeout=120)


@pytest.mark.qemu
def test_a_lab_rack_is_found_booted_grown_and_torn_down(lab_state, kernel_cache):
    up = cli(
        "lab",
        "up",
        "--machines",
        "qemu=1",
        "--image",
        "callback",
        "--no-join",
        state_dir=lab_state,
        timeout=180,
    )
    assert "lab " in up.stdout and "1 new" in up.stdout, up.stdout + up.stderr
    status = _wait_machines(lab_state, {"qemu1"})
    lab_id = status["lab"]
    [row] = status["machines"]
    assert row["power"] == "on" and row["state"] == "booting" and row["ip"].startswith("10.231.")
    console = cli("lab", "console", "qemu1", state_dir=lab_state).stdout
    assert "iPXE" in console and "callback accepted" in console, console
    assert len(lab_namespaces(lab_id)) == 3

    # rack another machine into the running lab: powered off, then found by the seed
    cli(
        "lab", "up", "--machines", "qemu=1", "--image", "callback", "--no-join", state_dir=lab_state
    )
    status = _wait_machines(lab_state, {"qemu1", "qemu2"})
    rows = {r["machine"]: r for r in status["machines"]}
    assert rows["qemu2"]["power"] == "on" and rows["qemu2"]["node"] != rows["qemu1"]["node"]
    nodes = json.loads(cli("nodes", "list", "--json", state_dir=lab_state).stdout)
    assert len(nodes) == 2  # nobody found twice

    down = cli("lab", "down", state_dir=lab_state, timeout=120)
    assert "down" in down.stderr
    assert lab_namespaces(lab_id) == []
    assert processes_mentioning(str(lab_state / "lab")) == []
    assert processes_mentioning("metalseed-qemu") == []
    assert "no lab is up" in cli("lab", "status", state_dir=lab_state).stdout


def test_lab_down_after_a_killed_lab_up_leaves_nothing(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    state = tmp_path / "state"
    argv = [sys.executable, "-m", "bootstrap", "--state-dir", str(state), "lab", "up"]
    argv += ["--machines", "qemu=2", "--image", "current", "--no-join"]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    record = state / "lab" / "lab.json"
    deadline = time.monotonic() + 30
    # kill it once it has made namespaces and started the BMC simulator (before the seed)
    while time.monotonic() < deadline:
        if record.exists() and '"bmcs-1"' in record.read_text():
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    lab = json.loads(record.read_text())
    assert lab_namespaces(lab["id"]), "the lab had made namespaces when it was killed"
    assert processes_mentioning(str(state / "lab")), "its BMC simulator was running"

    cli("lab", "down", state_dir=state, timeout=120)
    assert lab_namespaces(lab["id"]) == []
    assert processes_mentioning(str(state / "lab")) == []
    assert not record.exists()
    cli("lab", "down", state_dir=state)  # again: nothing to do, no error


def test_fifty_fake_machines_are_found_booted_and_enlisted(tmp_path, kernel_cache):
    """The fake kind does the firmware's steps for real, then enlists a generated inventory."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    state = tmp_path / "state"
    try:
        cli(
            "lab",
            "up",
            "--machines",
            "fake=50",
            "--image",
            "callback",
            "--no-join",  # fakes have no sshd: this test is about finding and enlisting
            state_dir=state,
            timeout=180,
        )
        deadline = time.monotonic() + TIMEOUT
        while True:
            status = _status(state)
            states = [r["state"] for r in status["machines"]]
            if states.count("enlisted") == 50:
                break
            assert time.monotonic() < deadline, f"not all enlisted: {states}"
            time.sleep(1)
        nodes = json.loads(cli("nodes", "list", "--json", state_dir=state).stdout)
        assert len(nodes) == 50 and len({n["guid"] for n in nodes}) == 50  # none duplicated
        assert all(r["power"] == "on" and r["ip"] for r in status["machines"])
        assert len({r["ip"] for r in status["machines"]}) == 50
        shown = json.loads(cli("nodes", "show", nodes[0]["node"], "--json", state_dir=state).stdout)
        assert shown["inventory"]["nics"][0]["mac"] in {r["mac"] for r in status["machines"]}
        lab_id = status["lab"]
    finally:
        cli("lab", "down", state_dir=state, timeout=120, check=False)
    assert lab_namespaces(lab_id) == []
    assert processes_mentioning(str(state / "lab")) == []
