"""Discovery and power over real IPMI (UDP on loopback) against the simulator process."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import FACTORY_PASSWORD, FACTORY_USER, cli


def ipmitool(bmc: str, *args: str, password: str = FACTORY_PASSWORD, user: str = FACTORY_USER):
    host, port = bmc.rsplit(":", 1)
    # ipmitool reads the password from the environment with -E: not on the command line
    return subprocess.run(
        ["ipmitool", "-I", "lanplus", "-H", host, "-p", port, "-U", user, "-E", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={"IPMI_PASSWORD": password},
    )


@pytest.mark.peer
def test_discover_enrolls_every_bmc_and_power_matches_ipmitool(
    bmc_sim, addr_block, creds_file, state_dir
):
    sim = bmc_sim("--count", "4", "--address", f"{addr_block}.1", "--port", "6230")
    out = cli(
        "discover",
        f"{addr_block}.0/24:6230",
        "--credentials",
        str(creds_file),
        "--json",
        state_dir=state_dir,
    )
    found = json.loads(out.stdout)
    assert sorted(r["bmc"] for r in found) == sorted(sim.endpoints())
    assert {r["guid"] for r in found} == {b["guid"] for b in sim.bmcs}
    assert {r["state"] for r in found} == {"enrolled"}

    cli("power", "on", found[0]["node"], found[1]["node"], state_dir=state_dir)
    status = json.loads(cli("power", "status", "--all", "--json", state_dir=state_dir).stdout)
    for row in status:
        assert set(row) >= {"node", "bmc", "power"}
        seen = ipmitool(row["bmc"], "power", "status")
        assert seen.returncode == 0, seen.stderr
        assert seen.stdout.strip() == f"Chassis Power is {row['power']}"
    assert sorted(r["power"] for r in status) == ["off", "off", "on", "on"]
