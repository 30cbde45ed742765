"""Applying the seed's answer under a temporary root: keys, time, firewall, hostname."""

from __future__ import annotations

import json
import logging
import stat
from pathlib import Path

import pytest

from bootstrap.agent.apply import (
    AUTHORIZED_KEYS,
    CHRONY_SOURCES,
    ENLIST_JSON,
    KERNEL_HOSTNAME,
    AnswerError,
    Applier,
    ApplyError,
    check_answer,
)

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGvc0ZKh3jzXbaYbjzH9LMF7DNqYkO4WN5vR2f3d0m1Q metalseed"
ANSWER = {
    "node": "node-6f1c3e2a",
    "state": "enlisted",
    "ssh_authorized_keys": [KEY],
    "time_servers": ["10.20.0.1"],
    "provisioning_cidr": "10.20.0.0/24",
    "hostname": "node-6f1c3e2a",
}


class Commands:
    """Records what would run; ``fail`` maps a command name to (status, output)."""

    def __init__(self, installed=("nft", "chronyc", "hostnamectl"), fail=None) -> None:
        self.installed = set(installed)
        self.fail = fail or {}
        self.ran: list[list[str]] = []

    def which(self, name: str) -> str | None:
        return f"/usr/sbin/{name}" if name in self.installed else None

    def run(self, argv) -> tuple[int, str]:
        self.ran.append(list(argv))
        return self.fail.get(Path(argv[0]).name, (0, ""))


def applier(root: Path, commands: Commands, run_commands: bool = True) -> Applier:
    return Applier(root, run_commands=run_commands, run=commands.run, which=commands.which)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_everything_is_applied(tmp_path):
    commands = Commands()
    applier(tmp_path, commands).apply(check_answer(ANSWER))
    keys = tmp_path / AUTHORIZED_KEYS
    assert KEY in keys.read_text().splitlines()
    assert mode(keys) == 0o600 and mode(keys.parent) == 0o700
    assert (tmp_path / CHRONY_SOURCES).read_text() == "server 10.20.0.1 iburst\n"
    assert commands.ran == [
        ["/usr/sbin/chronyc", "reload", "sources"],
        ["/usr/sbin/nft", "add", "element", "inet", "metalseed", "provisioning"]
        + ["{", "10.20.0.0/24", "}"],
        ["/usr/sbin/hostnamectl", "set-hostname", "node-6f1c3e2a"],
    ]
    assert json.loads((tmp_path / ENLIST_JSON).read_text()) == ANSWER
    assert not (tmp_path / KERNEL_HOSTNAME).exists()


def test_without_commands_only_files_change(tmp_path):
    commands = Commands()
    applier(tmp_path, commands, run_commands=False).apply(check_answer(ANSWER))
    assert commands.ran == []
    assert (tmp_path / KERNEL_HOSTNAME).read_text() == "node-6f1c3e2a\n"
    assert (tmp_path / ENLIST_JSON).exists()


def test_missing_tools_are_skipped(tmp_path):
    commands = Commands(installed=())
    applier(tmp_path, commands).apply(check_answer(ANSWER))
    assert commands.ran == []
    assert (tmp_path / KERNEL_HOSTNAME).read_text() == "node-6f1c3e2a\n"


def test_a_failed_chronyc_or_hostnamectl_is_only_a_warning(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    commands = Commands(fail={"chronyc": (1, "506 Cannot talk to daemon"), "hostnamectl": (1, "")})
    applier(tmp_path, commands).apply(check_answer(ANSWER))
    assert "Cannot talk to daemon" in caplog.text
    assert (tmp_path / KERNEL_HOSTNAME).read_text() == "node-6f1c3e2a\n"  # the fallback
    assert (tmp_path / ENLIST_JSON).exists()


def test_a_failed_firewall_update_is_an_error_after_the_rest(tmp_path):
    commands = Commands(fail={"nft": (1, "Error: No such file or directory")})
    with pytest.raises(ApplyError, match="nft could not allow 10.20.0.0/24"):
        applier(tmp_path, commands).apply(check_answer(ANSWER))
    assert (tmp_path / AUTHORIZED_KEYS).exists()  # the rest was done
    assert commands.ran[-1][1] == "set-hostname"
    assert not (tmp_path / ENLIST_JSON).exists()  # not marked done


def test_keys_are_replaced_not_appended(tmp_path):
    keys = tmp_path / AUTHORIZED_KEYS
    keys.parent.mkdir(parents=True)
    keys.write_text("ssh-rsa AAAAold intruder\n")
    keys.chmod(0o644)
    applier(tmp_path, Commands(), run_commands=False).apply(check_answer(ANSWER))
    assert "intruder" not in keys.read_text() and mode(keys) == 0o600


@pytest.mark.parametrize(
    "change",
    [
        {"node": None},
        {"node": ""},
        {"state": 3},
        {"hostname": "bad host"},
        {"hostname": "-x"},
        {"provisioning_cidr": "10.20.0.0/33"},
        {"ssh_authorized_keys": "ssh-ed25519 AAAA"},
        {"ssh_authorized_keys": ["ssh-ed25519 AAAA x\nssh-rsa BBBB evil"]},
        {"ssh_authorized_keys": ['command="sh" ssh-ed25519 AAAA']},
        {"time_servers": ["10.0.0.1 iburst\nserver evil"]},
        {"time_servers": [7]},
    ],
)
def test_unusable_answers_are_refused(change):
    with pytest.raises(AnswerError):
        check_answer({**ANSWER, **change})


def test_an_answer_without_a_network_leaves_the_firewall(tmp_path):
    commands = Commands()
    applier(tmp_path, commands).apply(check_answer({**ANSWER, "provisioning_cidr": None}))
    assert all("nft" not in argv[0] for argv in commands.ran)


# -- a cluster member's reboot: ceph.conf, then its OSDs from their disks ----------------

CONF = "[global]\nfsid = 2f0e8d6a-0000-4000-8000-000000000001\nmon_host = [v2:10.20.0.11:3300]\n"
DISKS = [
    {"name": "sdb", "signature": "ceph_bluestore", "empty": False},
    {"name": "sdc", "signature": None, "empty": True},
    {"name": "sdd", "signature": "ext4", "empty": False},
]


def test_a_member_gets_its_conf_and_its_labelled_disks_activated(tmp_path):
    script = tmp_path / "usr/lib/metalseed/osd-device.sh"
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\n")
    commands = Commands(installed={"chronyc", "nft", "hostnamectl", "systemd-run"})
    Applier(tmp_path, run_commands=True, run=commands.run, which=commands.which, disks=DISKS).apply(
        check_answer({**ANSWER, "ceph_conf": CONF})
    )
    assert (tmp_path / "etc/ceph/ceph.conf").read_text() == CONF
    activations = [argv for argv in commands.ran if argv[0].endswith("/systemd-run")]
    # only the disk with a bluestore label; never the empty one (a join prepares those);
    # in a unit of its own (ceph-volume's tmpfs mount must outlive the agent's namespace)
    assert len(activations) == 1
    assert activations[0][-5:] == ["sh", str(script), "ceph", "/dev/sdb", "--activate-only"]
    assert "--wait" in activations[0]


def test_a_node_that_is_no_member_gets_no_ceph_conf(tmp_path):
    commands = Commands(installed={"chronyc", "nft", "hostnamectl", "systemd-run"})
    Applier(tmp_path, run_commands=True, run=commands.run, which=commands.which, disks=DISKS).apply(
        check_answer(ANSWER)
    )
    assert not (tmp_path / "etc/ceph").exists()
    assert not any(argv[0].endswith("/systemd-run") for argv in commands.ran)


@pytest.mark.parametrize("conf", [7, "x" * 20000, "fsid = 1\0"])
def test_an_unusable_ceph_conf_is_refused(conf):
    with pytest.raises(AnswerError, match="ceph_conf"):
        check_answer({**ANSWER, "ceph_conf": conf})
