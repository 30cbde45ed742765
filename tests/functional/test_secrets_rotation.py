"""Secrets never leak, and a killed rotation never locks us out of a BMC."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bootstrap.actions import open_store
from bootstrap.config import load
from tests.conftest import FACTORY_PASSWORD, REPO, cli
from tests.functional.test_discover_power import ipmitool

PORT = 6232


def stored_passwords(state_dir: Path) -> list[str]:
    store = open_store(load(None, env={}, flags={"state_dir": state_dir}))
    try:
        secrets = []
        for node in store.list_nodes():
            for cred in (store.get_credential(node.id), store.get_pending_credential(node.id)):
                if cred is not None:
                    secrets.append(cred.password.reveal())
        return secrets
    finally:
        store.close()


@pytest.mark.peer
def test_no_password_appears_in_logs_output_state_or_arguments(
    bmc_sim, addr_block, creds_file, state_dir
):
    sim = bmc_sim("--count", "3", "--address", f"{addr_block}.1", "--port", str(PORT))
    outputs = []
    for args in (
        [
            "--log-level",
            "debug",
            "discover",
            f"{addr_block}.0/29:{PORT}",
            "--credentials",
            str(creds_file),
            "--rotate",
            "--json",
        ],
        ["--log-level", "debug", "power", "on", "--all", "--json"],
        ["--log-level", "debug", "power", "status", "--all"],
        ["nodes", "list", "--json"],
        ["events", "--json", "--limit", "1000"],
    ):
        proc = cli(*args, state_dir=state_dir)
        outputs += [proc.stdout, proc.stderr]
    for row in json.loads(cli("nodes", "list", "--json", state_dir=state_dir).stdout):
        outputs.append(cli("nodes", "show", row["node"], "--json", state_dir=state_dir).stdout)

    rotated = stored_passwords(state_dir)
    assert len(rotated) == 3 and FACTORY_PASSWORD not in rotated
    secrets = [FACTORY_PASSWORD, *rotated]

    haystacks = {"cli output": "\n".join(outputs), "simulator log": sim.log.read_text()}
    for path in state_dir.iterdir():
        haystacks[path.name] = path.read_bytes().decode("latin-1")
    haystacks["simulator argv"] = Path(f"/proc/{sim.proc.pid}/cmdline").read_bytes().decode()
    for where, text in haystacks.items():
        for secret in secrets:
            assert secret not in text, f"a BMC password leaked into {where}"

    # the rotated logins are real: ipmitool can use them (password via environment)
    rows = json.loads(cli("power", "status", "--all", "--json", state_dir=state_dir).stdout)
    assert all(r["power"] == "on" for r in rows)
    # which rotated password belongs to which BMC is not printed anywhere; one of them works
    attempts = [
        ipmitool(rows[0]["bmc"], "power", "status", user="metalseed", password=p) for p in rotated
    ]
    assert [a.returncode for a in attempts].count(0) == 1, [a.stderr for a in attempts]


@pytest.mark.peer
def test_killing_discover_mid_rotation_never_locks_us_out(
    bmc_sim, addr_block, creds_file, state_dir
):
    sim = bmc_sim(
        "--count", "6", "--address", f"{addr_block}.1", "--port", str(PORT), "--latency", "0.02"
    )
    argv = [
        sys.executable,
        "-m",
        "bootstrap",
        "--state-dir",
        str(state_dir),
        "discover",
        f"{addr_block}.0/29:{PORT}",
        "--credentials",
        str(creds_file),
        "--rotate",
        "--json",
    ]
    killed = 0
    for delay in (0.45, 0.6, 0.75, 0.9, 1.1, 1.3):
        proc = subprocess.Popen(
            argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        time.sleep(delay)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            killed += 1
        proc.wait(30)
    assert killed >= 3, "the runs finished before they could be interrupted"

    final = json.loads(
        cli(
            "discover",
            f"{addr_block}.0/29:{PORT}",
            "--credentials",
            str(creds_file),
            "--rotate",
            "--json",
            state_dir=state_dir,
            timeout=180,
        ).stdout
    )
    assert len(final) == 6
    assert {r["state"] for r in final} == {"enrolled"}
    assert {r["username"] for r in final} == {"metalseed"}
    assert all(r["error"] is None for r in final)

    # every stored login works: power status over all six succeeds
    status = cli("power", "status", "--all", "--json", state_dir=state_dir)
    assert all(r["error"] is None for r in json.loads(status.stdout))
    # and no BMC collected duplicate metalseed users from the interrupted runs
    for bmc in sim.endpoints():
        users = ipmitool(bmc, "user", "list", "1")
        assert users.returncode == 0, users.stderr
        assert users.stdout.count("metalseed") == 1, users.stdout
