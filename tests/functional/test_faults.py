"""Fault injection over real IPMI: a rack of simulated BMCs that misbehave in known ways.

One simulator process serves every kind of BMC an operator meets: a healthy
one, a lossy one, a slow one, an older one that refuses SHA-256 cipher suites,
a machine that is already on, one with another password, and a dead one.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import FACTORY_PASSWORD, cli
from tests.functional.test_discover_power import ipmitool

PORT = 6231


@pytest.fixture
def rack(bmc_sim, addr_block, tmp_path):
    kinds = {
        "healthy": {},
        "lossy": {"faults": {"drop": 0.25}},
        "slow": {"faults": {"latency": 0.3}},
        "sha1": {"faults": {"sha1_only": True}},
        "already_on": {"power": "on"},
        "other_password": {"users": [["admin", "not-the-factory-one"]]},
        "dead": {"faults": {"unresponsive": True}},
    }
    spec = {"bmcs": []}
    where = {}
    for i, (kind, extra) in enumerate(kinds.items(), start=1):
        address = f"{addr_block}.{i}"
        spec["bmcs"].append({"address": address, "port": PORT, **extra})
        where[kind] = f"{address}:{PORT}"
    path = tmp_path / "rack.json"
    path.write_text(json.dumps(spec))
    sim = bmc_sim("--spec", str(path), "--seed", "7")
    return sim, where


def by_bmc(rows):
    return {r["bmc"]: r for r in rows}


@pytest.mark.peer
def test_discovery_of_a_misbehaving_rack(rack, addr_block, creds_file, state_dir):
    sim, where = rack
    proc = cli(
        "discover",
        f"{addr_block}.0/24:{PORT}",
        "--credentials",
        str(creds_file),
        "--json",
        state_dir=state_dir,
        check=False,
        timeout=180,
    )
    assert proc.returncode == 1, proc.stderr  # some BMCs failed: not a clean run
    assert "Traceback" not in proc.stderr
    rows = by_bmc(json.loads(proc.stdout))

    for kind in ("healthy", "lossy", "slow", "sha1", "already_on"):
        assert rows[where[kind]]["state"] == "enrolled", (kind, rows[where[kind]])
        assert rows[where[kind]]["error"] is None
    assert rows[where["already_on"]]["power"] == "on"

    refused = rows[where["other_password"]]
    assert refused["state"] == "discovered", refused
    assert "refused every login" in refused["error"]
    assert FACTORY_PASSWORD not in proc.stdout + proc.stderr

    # A dead BMC does not answer the presence probe: not a node at all.
    assert where["dead"] not in rows
    nodes = json.loads(cli("nodes", "list", "--json", state_dir=state_dir).stdout)
    assert len(nodes) == 6


@pytest.mark.peer
def test_power_across_the_rack_reports_each_node(rack, addr_block, creds_file, state_dir):
    sim, where = rack
    cli(
        "discover",
        f"{addr_block}.0/24:{PORT}",
        "--credentials",
        str(creds_file),
        state_dir=state_dir,
        check=False,
        timeout=180,
    )
    proc = cli("power", "on", "--all", "--json", state_dir=state_dir, check=False, timeout=180)
    rows = by_bmc(json.loads(proc.stdout))
    assert proc.returncode != 0
    for kind in ("healthy", "lossy", "slow", "sha1"):
        assert rows[where[kind]]["power"] == "on" and rows[where[kind]]["changed"], kind
    assert rows[where["already_on"]]["changed"] is False
    assert rows[where["already_on"]]["power"] == "on"
    failed = rows[where["other_password"]]
    assert "no working BMC login" in failed["error"]

    # ipmitool sees what metalseed reports, on the SHA-1-only BMC too
    for kind in ("healthy", "sha1", "already_on"):
        seen = ipmitool(where[kind], "power", "status")
        assert seen.stdout.strip() == "Chassis Power is on", (kind, seen.stderr)

    node = failed["node"]
    shown = json.loads(cli("nodes", "show", node, "--json", state_dir=state_dir).stdout)
    assert shown["state"] == "failed"
    assert "power on failed" in shown["reason"]
    assert any("power on failed" in e["message"] for e in shown["events"])


@pytest.mark.peer
def test_wrong_password_after_enrollment_is_fatal_and_named(
    bmc_sim, addr_block, creds_file, state_dir, tmp_path
):
    first = bmc_sim("--count", "1", "--address", f"{addr_block}.1", "--port", str(PORT))
    row = json.loads(
        cli(
            "discover",
            f"{addr_block}.1:{PORT}",
            "--credentials",
            str(creds_file),
            "--json",
            state_dir=state_dir,
        ).stdout
    )[0]
    # The BMC is reset to another password behind our back (same address, same GUID).
    first.proc.terminate()
    first.proc.wait(10)
    other = tmp_path / "other-creds"
    other.write_text("admin:changed-by-someone\n")
    other.chmod(0o600)
    bmc_sim("--count", "1", "--address", f"{addr_block}.1", "--port", str(PORT), credentials=other)
    proc = cli("power", "status", row["node"], "--json", state_dir=state_dir, check=False)
    assert proc.returncode == 77
    [status] = json.loads(proc.stdout)
    assert status["power"] == "unknown"
    assert "refused the login for user 'admin'" in status["error"]
    assert "changed-by-someone" not in proc.stdout + proc.stderr


@pytest.mark.peer
def test_a_bmc_that_dies_after_enrollment_times_out_cleanly(
    bmc_sim, addr_block, creds_file, state_dir
):
    sim = bmc_sim("--count", "1", "--address", f"{addr_block}.1", "--port", str(PORT))
    row = json.loads(
        cli(
            "discover",
            f"{addr_block}.1:{PORT}",
            "--credentials",
            str(creds_file),
            "--json",
            state_dir=state_dir,
        ).stdout
    )[0]
    sim.proc.terminate()
    sim.proc.wait(10)
    env = {"METALSEED_BMC_ATTEMPTS": "2", "METALSEED_BMC_BACKOFF": "0.1"}
    proc = cli("power", "on", row["node"], state_dir=state_dir, check=False, env=env, timeout=120)
    assert proc.returncode == 75  # retryable, retries exhausted
    assert "failed after 2 attempts" in proc.stdout
    assert "Traceback" not in proc.stderr
    events = json.loads(cli("events", row["node"], "--json", state_dir=state_dir).stdout)
    assert "power on failed" in events[-1]["message"]
