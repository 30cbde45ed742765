"""The BMC simulator itself: power hooks, boot flags, users, identity, bad input.

The in-process tests run the simulator loop on a thread and talk to it with
metalseed's real IPMI driver (pyghmi) over UDP on loopback.
"""

from __future__ import annotations

import random
import socket
import threading
import time
import uuid

import pytest

from bootstrap.errors import BmcAuthError
from bootstrap.lab.bmcrun import BmcSimulator, generate_specs
from bootstrap.models import BmcAddress, Credential
from bootstrap.power.base import BmcTarget
from bootstrap.power.ipmi import IpmiPowerDriver
from tests.conftest import FACTORY_PASSWORD, FACTORY_USER, cli
from tests.functional.test_discover_power import ipmitool

PORT = 6233
LOGIN = Credential(FACTORY_USER, FACTORY_PASSWORD)


@pytest.fixture
def sim_thread(addr_block):
    """A simulator with two BMCs running on a thread; records power hook calls."""
    calls: list[tuple[str, str]] = []
    specs = generate_specs(2, f"{addr_block}.1", PORT)
    sim = BmcSimulator(
        specs,
        default_users=[(FACTORY_USER, FACTORY_PASSWORD)],
        power_hook=lambda bmc, state: calls.append((str(bmc.uuid), state)),
    )
    sim.start()
    stop = threading.Event()
    thread = threading.Thread(target=sim.run, args=(stop,), daemon=True)
    thread.start()
    yield sim, calls
    stop.set()
    thread.join(5)
    assert not thread.is_alive()


def target(sim, i=0, cred=LOGIN):
    bmc = sim.bmcs[i]
    return BmcTarget(BmcAddress(bmc.address, bmc.port), cred)


def test_python_power_hook_sees_every_change(sim_thread):
    sim, calls = sim_thread
    driver = IpmiPowerDriver(power_wait=5)
    guid = str(sim.bmcs[0].uuid)
    driver.set_power(target(sim), "on")
    driver.set_power(target(sim), "on")  # already on: no hook call
    driver.set_power(target(sim), "off")
    assert calls == [(guid, "on"), (guid, "off")]
    assert sim.bmcs[1].machine.power == "off"  # the other machine was not touched


def test_boot_flags_keep_persistence(sim_thread):
    sim, _ = sim_thread
    driver = IpmiPowerDriver()
    driver.set_boot_device(target(sim), "pxe", persistent=True)
    assert (sim.bmcs[0].machine.bootdev, sim.bmcs[0].machine.bootdev_persistent) == (
        "network",
        True,
    )
    driver.set_boot_device(target(sim), "disk")
    assert (sim.bmcs[0].machine.bootdev, sim.bmcs[0].machine.bootdev_persistent) == ("hd", False)


def test_identity_reads_guid_mac_and_fru(sim_thread):
    sim, _ = sim_thread
    identity = IpmiPowerDriver().identify(target(sim, 1))
    bmc = sim.bmcs[1]
    assert identity.guid == str(bmc.uuid)
    assert identity.mac == bmc.mac
    assert identity.fru["manufacturer"] == "metalseed lab"
    assert identity.fru["serial"].startswith("LAB")
    assert identity.manufacturer_id == 0xA0A0 and identity.firmware == "1.02"


def test_user_commands_make_a_new_login_and_keep_the_old(sim_thread):
    sim, _ = sim_thread
    driver = IpmiPowerDriver()
    new = Credential("metalseed", "Zq8-rotated-pw-01")
    driver.ensure_user(target(sim), new)
    driver.check_login(target(sim, cred=new))
    driver.check_login(target(sim))  # factory login still works
    again = Credential("metalseed", "Zq8-rotated-pw-02")
    driver.ensure_user(target(sim), again)  # same slot, new password
    with pytest.raises(BmcAuthError):
        driver.check_login(target(sim, cred=new))
    driver.check_login(target(sim, cred=again))
    names = [u.name for u in sim.bmcs[0].users.slots.values()]
    assert names.count("metalseed") == 1


def test_garbage_datagrams_are_dropped_and_service_continues(sim_thread):
    sim, _ = sim_thread
    bmc = sim.bmcs[0]
    rng = random.Random(5)
    junk = [
        b"",
        b"\x06\x00\xff\x07",
        b"\x06\x00\xff\x07\x06\x10" + b"\x00" * 12,
        b"\x06\x00\xff\x07\x06\x12" + b"\x00" * 40,
        b"\x06\x00\xff\x07\x00" + b"\xff" * 30,
    ]
    junk += [bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 120))) for _ in range(300)]
    # a plausible RMCP header on random bodies reaches deeper into the parsers
    junk += [
        b"\x06\x00\xff\x07" + bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 80)))
        for _ in range(300)
    ]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for packet in junk:
            sock.sendto(packet, (bmc.address, bmc.port))
    time.sleep(0.3)
    assert IpmiPowerDriver().power_state(target(sim)) == "off"


@pytest.mark.peer
def test_command_power_hook_runs_with_the_bmc_in_its_environment(
    bmc_sim, addr_block, tmp_path, creds_file, state_dir
):
    record = tmp_path / "hook.log"
    hook = tmp_path / "hook.sh"
    hook.write_text(f'#!/bin/sh\necho "$METALSEED_POWER $METALSEED_BMC_GUID" >> {record}\n')
    hook.chmod(0o755)
    sim = bmc_sim(
        "--count",
        "1",
        "--address",
        f"{addr_block}.1",
        "--port",
        str(PORT),
        "--power-hook",
        str(hook),
    )
    bmc = sim.bmcs[0]
    cli("discover", f"{bmc['bmc']}", "--credentials", str(creds_file), state_dir=state_dir)
    cli("power", "on", "--all", state_dir=state_dir)
    cli("power", "off", "--all", state_dir=state_dir)
    deadline = time.monotonic() + 5
    while not record.exists() or record.read_text().count("\n") < 2:
        assert time.monotonic() < deadline, "power hook never ran"
        time.sleep(0.05)
    assert record.read_text().splitlines() == [f"on {bmc['guid']}", f"off {bmc['guid']}"]


@pytest.mark.peer
def test_ipmitool_sees_guid_in_ipmi_encoding(bmc_sim, addr_block):
    sim = bmc_sim("--count", "1", "--address", f"{addr_block}.1", "--port", str(PORT))
    out = ipmitool(sim.bmcs[0]["bmc"], "mc", "guid")
    assert out.returncode == 0, out.stderr
    assert f"System GUID   : {sim.bmcs[0]['guid']}" in out.stdout
    assert "GUID Encoding : IPMI" in out.stdout
    uuid.UUID(sim.bmcs[0]["guid"])


def test_simulator_refuses_a_busy_endpoint_with_a_clear_error(addr_block):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind((f"{addr_block}.9", PORT))
        sim = BmcSimulator(generate_specs(1, f"{addr_block}.9", PORT), default_users=[("a", "b")])
        with pytest.raises(Exception, match="cannot bind BMC .*Address already in use"):
            sim.start()
