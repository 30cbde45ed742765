"""The Vagrant lab: the Vagrantfile validates with Debian's vagrant + vagrant-libvirt,
and the workstation-side virtual BMCs (scripts/vagrant/bmcs.sh) serve every node.

No hypervisor runs here (no libvirtd, no usable KVM), so `vagrant up` cannot; what
can run, does: vagrant's own validation of the file and the libvirt provider's
options, and the BMC script for real on loopback, with a recording stand-in for
`virsh` (the one part that needs libvirtd) so the power hook's calls are checked.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO, cli

pytestmark = pytest.mark.peer

VAGRANT = shutil.which("vagrant")


def _validate(directory: Path, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {
        **os.environ,
        "VAGRANT_DEFAULT_PROVIDER": "libvirt",
        "VAGRANT_DOTFILE_PATH": str(tmp_path / "dot"),
        "VAGRANT_HOME": str(tmp_path / "home"),
        **env,
    }
    return subprocess.run(
        ["vagrant", "validate"],
        cwd=directory,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def vagrant() -> str:
    if VAGRANT is None:
        pytest.skip("vagrant is not installed (make setup installs vagrant, vagrant-libvirt)")
    return VAGRANT


@pytest.mark.parametrize("nodes", ["1", "3", "6"])
def test_the_vagrantfile_validates_with_the_libvirt_provider(vagrant, tmp_path, nodes):
    proc = _validate(REPO, tmp_path, METALSEED_NODES=nodes)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "validated successfully" in proc.stdout


def test_a_wrong_provider_option_fails_validation(vagrant, tmp_path):
    copy = tmp_path / "lab"
    shutil.copytree(REPO / "scripts" / "vagrant", copy / "scripts" / "vagrant")
    text = (REPO / "Vagrantfile").read_text()
    assert "lv.mgmt_attach = false" in text
    (copy / "Vagrantfile").write_text(text.replace("lv.mgmt_attach", "lv.mgmt_atach"))
    proc = _validate(copy, tmp_path)
    assert proc.returncode != 0
    assert "mgmt_atach" in proc.stdout + proc.stderr


def _node_uuid(i: int) -> str:
    return f"6d657461-6c73-6565-6400-{i:012x}"


def test_the_virtual_bmcs_serve_each_node_and_drive_its_domain(tmp_path, addr_block):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    calls = tmp_path / "virsh.calls"
    (bindir / "virsh").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bindir / "virsh").chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bindir}:{os.environ['PATH']}",
        "METALSEED_BMC_ADDRESS": f"{addr_block}.1",
        "METALSEED_VAGRANT_STATE": str(tmp_path / "vagrant"),
    }
    script = REPO / "scripts" / "vagrant" / "bmcs.sh"
    started = subprocess.run(
        ["bash", str(script), "start", "3", "7230"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    state = tmp_path / "vagrant"
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        # every node powered off first, by its UUID
        assert calls.read_text().split("\n")[:3] == [
            f"-c qemu:///system destroy {_node_uuid(i)}" for i in (1, 2, 3)
        ]
        creds = state / "bmc-credentials"
        assert oct(creds.stat().st_mode & 0o777) == "0o600"
        endpoints = [f"{addr_block}.1:{7230 + i}" for i in (1, 2, 3)]
        found = json.loads(
            cli(
                "discover",
                *endpoints,
                "--credentials",
                str(creds),
                "--json",
                state_dir=tmp_path / "seed",
            ).stdout
        )
        assert sorted(f["guid"] for f in found) == [_node_uuid(i) for i in (1, 2, 3)]
        assert all(f["state"] == "enrolled" for f in found)
        cli("power", "on", endpoints[1], state_dir=tmp_path / "seed")
        assert f"-c qemu:///system start {_node_uuid(2)}" in calls.read_text()
    finally:
        stopped = subprocess.run(
            ["bash", str(script), "stop"], env=env, capture_output=True, text=True, timeout=30
        )
        assert stopped.returncode == 0, stopped.stderr
        assert not (state / "bmcs.pid").exists()
