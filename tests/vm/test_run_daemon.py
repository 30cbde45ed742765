"""`metalseed run`: zero touch with real firmware.

The daemon sweeps a BMC range, enrolls what answers, sets PXE, powers it on
and serves its netboot, with no other command. A machine "racked" while the
daemon runs (its BMC appears later) is found on the next sweep and booted
too, and a restarted daemon resumes from the store without booting anything
twice. The machines are QEMU VMs with the ipxe-qemu ROM, booting the
call-back image (the node image's enlist is tested in test_node_image_boot).
"""

from __future__ import annotations

import json
import signal
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import REPO, cli
from tests.vm.conftest import HTTP_PORT, POOL

pytestmark = [pytest.mark.qemu, pytest.mark.root, pytest.mark.netns]

TIMEOUT = 120


def _events(state: Path, node: str) -> list[dict]:
    out = cli("events", node, "--json", "--limit", "500", state_dir=state).stdout
    return sorted(json.loads(out), key=lambda e: e["id"])


def _wait(what: str, check, timeout: float = TIMEOUT, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            tail = log.read_text()[-3000:] if log and log.exists() else ""
            raise AssertionError(f"{what}: not within {timeout} s\n{tail}")
        time.sleep(0.5)


def _node_for(state: Path, guid: str) -> dict | None:
    nodes = json.loads(cli("nodes", "list", "--json", state_dir=state).stdout)
    return next((n for n in nodes if n["guid"] == guid), None)


def _called_back(state: Path, node: str) -> bool:
    return any(e["kind"] == "boot.callback" for e in _events(state, node))


def _bmc_in_seed(seed_process, tmp_path, creds, address, guid, machines_file) -> None:
    """A simulated BMC inside the seed's namespace (the daemon sweeps from there)."""
    from bootstrap.lab.qemu import hook_command

    name = address.replace(".", "-")
    spec, manifest = tmp_path / f"bmc-{name}.json", tmp_path / f"bmc-{name}.manifest"
    spec.write_text(json.dumps({"bmcs": [{"address": address, "guid": guid}]}))
    argv = [sys.executable, "-m", "bootstrap", "lab", "bmc", "--spec", str(spec)]
    argv += ["--credentials", str(creds), "--manifest", str(manifest)]
    argv += ["--power-hook", hook_command(machines_file)]
    proc = seed_process(argv, tmp_path / f"bmc-{name}.log", cwd=REPO)
    _wait(f"BMC {address} listening", lambda: manifest.exists() or proc.poll() is not None, 20)
    assert proc.poll() is None, (tmp_path / f"bmc-{name}.log").read_text()


def test_run_finds_boots_and_keeps_finding(
    kernel_cache,
    qemu_available,
    segment,
    vms,
    seed_process,
    addr_block,
    creds_file,
    tmp_path,
):
    from bootstrap.image.callback import ensure_callback_image

    state = tmp_path / "state"
    ensure_callback_image(state / "images", cache_dir=kernel_cache, make_current=True)
    first = vms("vm-first", "52:54:00:00:0c:01")
    bmc = (seed_process, tmp_path, creds_file)
    _bmc_in_seed(*bmc, f"{addr_block}.1", first.uuid, vms.machines_file)

    log = tmp_path / "run.log"
    argv = [sys.executable, "-m", "bootstrap", "--state-dir", str(state), "run"]
    argv += ["--range", f"{addr_block}.0/29:623", "--credentials", str(creds_file)]
    argv += ["--sweep-interval", "2", "--interface", segment.interface, "--pool", POOL]
    argv += ["--http-port", str(HTTP_PORT)]
    daemon = seed_process(argv, log, cwd=REPO)

    node1 = _wait("first machine enrolled", lambda: _node_for(state, first.uuid), log=log)
    _wait("first machine called home", lambda: _called_back(state, node1["node"]), log=log)
    events = _events(state, node1["node"])
    netboot = [e for e in events if "netboot attempt 1" in e["message"]]
    assert netboot and netboot[0]["data"].get("to") == "booting", events

    # rack a second machine: its BMC shows up on the range while the daemon runs
    second = vms("vm-second", "52:54:00:00:0c:02", guid=str(uuid.uuid4()))
    _bmc_in_seed(*bmc, f"{addr_block}.2", second.uuid, vms.machines_file)
    node2 = _wait("racked machine found", lambda: _node_for(state, second.uuid), log=log)
    _wait("racked machine called home", lambda: _called_back(state, node2["node"]), log=log)

    # a restarted daemon resumes: nothing is netbooted a second time
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(60) == 0, log.read_text()[-2000:]
    assert not (state / "serve.json").exists()
    log2 = tmp_path / "run2.log"
    seed_process(argv, log2, cwd=REPO)
    _wait("daemon back", lambda: (state / "serve.json").exists(), 60, log2)
    time.sleep(5)  # two sweeps and a few passes
    for node in (node1, node2):
        attempts = [e for e in _events(state, node["node"]) if "netboot attempt" in e["message"]]
        assert len(attempts) == 1, attempts
        shown = json.loads(cli("nodes", "show", node["node"], "--json", state_dir=state).stdout)
        assert shown["state"] == "booting" and shown["facts"]["netboot_attempts"] == 1
