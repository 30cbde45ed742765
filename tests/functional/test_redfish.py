"""Redfish against a service nobody here wrote: OpenStack's sushy-tools emulator.

Discovery, power, boot device and rotation through the CLI, checked against
the emulator's own API; faults (5xx, timeouts, a vanished System, a late
Reset) through a proxy in front of it; HTTPS with a CA of the test's own.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time

import pytest
import requests

from bootstrap.config import BmcConfig, Config, RunConfig
from bootstrap.controlplane.orchestrator import Orchestrator
from bootstrap.errors import BmcAuthError, BmcBusy, BmcGone
from bootstrap.models import BmcAddress, Credential
from bootstrap.power import Drivers, driver_for
from bootstrap.power.base import BmcTarget
from bootstrap.power.redfish import BmcTlsError
from bootstrap.secretbox import SecretBox
from bootstrap.states import NodeState
from bootstrap.store.sqlite import SqliteStore
from tests.conftest import cli
from tests.functional.redfish_env import PASSWORD, USER, Emulator, FaultProxy

pytestmark = pytest.mark.peer
HOST = "127.77.0.1"


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    emu = Emulator(tmp_path_factory.mktemp("sushy"), HOST, count=3).start()
    yield emu
    emu.stop()


@pytest.fixture(scope="module")
def proxy(emulator):
    fp = FaultProxy(emulator, HOST).start()
    yield fp
    fp.stop()


@pytest.fixture
def faults(proxy):
    proxy.reset()
    yield proxy
    proxy.reset()
    proxy.accounts = False


def creds(tmp_path, *lines: str):
    path = tmp_path / "creds"
    path.write_text("".join(f"{line}\n" for line in lines))
    path.chmod(0o600)
    return path


def driver(**kwargs):
    config = BmcConfig(**{"attempts": 3, "backoff": 0.1, "timeout": 2.0, **kwargs})
    return driver_for("redfish", config)


def system_target(emulator, n=0, password=PASSWORD, via=None) -> BmcTarget:
    host, port = (via.host, via.port) if via else (emulator.host, emulator.port)
    path = f"/redfish/v1/Systems/{emulator.systems[n]['uuid']}"
    address = BmcAddress.redfish(emulator.scheme if via is None else "http", host, port, path)
    return BmcTarget(address, Credential(USER, password))


def test_discover_power_and_boot_device_agree_with_the_emulator(emulator, tmp_path, state_dir):
    file = creds(tmp_path, "admin:not-this-one", f"{USER}:{PASSWORD}")
    proc = cli("discover", emulator.range, "--credentials", str(file), "--json",
               state_dir=state_dir)  # fmt: skip
    rows = json.loads(proc.stdout)
    assert sorted(r["guid"] for r in rows) == sorted(s["uuid"] for s in emulator.systems)
    assert {(r["driver"], r["state"], r["username"], r["error"]) for r in rows} == {
        ("redfish", "enrolled", USER, None)
    }
    nodes = json.loads(cli("nodes", "list", "--json", state_dir=state_dir).stdout)
    assert {n["driver"] for n in nodes} == {"redfish"}
    by_guid = {n["guid"]: n for n in nodes}
    for system in emulator.systems:
        node = by_guid[system["uuid"]]
        assert node["bmc"].endswith(f"/redfish/v1/Systems/{system['uuid']}")
        assert node["facts"]["macs"] == [system["nics"][0]["mac"]]

    out = json.loads(cli("boot-device", "pxe", "--all", "--json", state_dir=state_dir).stdout)
    assert all(o["error"] is None and o["driver"] == "redfish" for o in out)
    for system in emulator.systems:
        assert emulator.system(system["uuid"])["Boot"]["BootSourceOverrideTarget"] == "Pxe"
    cli("boot-device", "disk", "--persistent", by_guid[emulator.systems[0]["uuid"]]["node"],
        state_dir=state_dir)  # fmt: skip
    assert emulator.system(emulator.systems[0]["uuid"])["Boot"]["BootSourceOverrideTarget"] == (
        "Hdd"
    )

    started = time.monotonic()
    out = json.loads(cli("power", "on", "--all", "--json", state_dir=state_dir).stdout)
    assert {(o["power"], o["error"]) for o in out} == {("on", None)}
    print(f"power on --all of {len(out)} Systems: {time.monotonic() - started:.1f} s")
    for system in emulator.systems:  # metalseed waited for the state: it is there now
        assert emulator.system(system["uuid"])["PowerState"] == "On"
    cli("power", "off", by_guid[emulator.systems[1]["uuid"]]["node"], state_dir=state_dir)
    assert emulator.system(emulator.systems[1]["uuid"])["PowerState"] == "Off"
    status = json.loads(cli("power", "status", "--all", "--json", state_dir=state_dir).stdout)
    want = {s["uuid"]: emulator.system(s["uuid"])["PowerState"].lower() for s in emulator.systems}
    assert {by_guid_id(nodes, o["node"]): o["power"] for o in status} == want

    # the password is nowhere: not in output, not in the store, not in any event
    events = cli("events", "--json", "--limit", "500", state_dir=state_dir).stdout
    stored = b"".join(p.read_bytes() for p in state_dir.rglob("*") if p.is_file())
    for text in (proc.stdout, proc.stderr, events):
        assert PASSWORD not in text
    assert PASSWORD.encode() not in stored


def by_guid_id(nodes, node_id):
    return next(n["guid"] for n in nodes if n["node"] == node_id)


def test_boot_override_is_once_or_continuous(emulator, faults):
    """sushy-tools keeps the target but reports Continuous whatever it is sent, so what
    metalseed asks for is read off the wire, at the proxy."""
    drv = driver()
    target = system_target(emulator, via=faults)
    drv.set_boot_device(target, "pxe", False)
    drv.set_boot_device(target, "disk", True)
    sent = [body["Boot"] for method, _, body in faults.bodies if method == "PATCH"]
    assert [(b["BootSourceOverrideTarget"], b["BootSourceOverrideEnabled"]) for b in sent] == [
        ("Pxe", "Once"),
        ("Hdd", "Continuous"),
    ]
    assert emulator.system(emulator.systems[0]["uuid"])["Boot"]["BootSourceOverrideTarget"] == (
        "Hdd"
    )


def test_a_wrong_password_is_refused_at_once(emulator):
    started = time.monotonic()
    with pytest.raises(BmcAuthError, match="refused the login for user 'root'") as info:
        driver().power_state(system_target(emulator, password="wrong-one"))
    assert time.monotonic() - started < 2.0
    assert "wrong-one" not in str(info.value)


def test_server_errors_and_timeouts_are_retried(emulator, faults):
    drv = driver()
    faults.fail_next = 2  # two 503s: sushy repeats once, the base retries once more
    assert drv.power_state(system_target(emulator, via=faults)) in ("on", "off")
    faults.fail_next, faults.fail_status = 50, 500
    with pytest.raises(BmcBusy, match="server error HTTP 500"):
        drv.power_state(system_target(emulator, via=faults))
    faults.fail_next = 0
    faults.hold_next, faults.hold_seconds = 1, 5.0  # one answer held past the 2 s timeout
    started = time.monotonic()
    assert drv.power_state(system_target(emulator, via=faults)) in ("on", "off")
    assert 2.0 <= time.monotonic() - started < 8.0


def test_a_system_that_disappears_is_gone_not_retried(emulator, faults, tmp_path, state_dir):
    target = system_target(emulator, n=2, via=faults)
    file = creds(tmp_path, f"{USER}:{PASSWORD}")
    cli("discover", faults.range, "--credentials", str(file), state_dir=state_dir)
    faults.gone.add(target.address.path)
    with pytest.raises(BmcGone, match="no longer has the System"):
        driver().power_state(target)
    proc = cli("discover", faults.range, "--credentials", str(file), "--json",
               state_dir=state_dir, check=False)  # fmt: skip
    rows = {r["guid"]: r for r in json.loads(proc.stdout)}
    gone = rows[emulator.systems[2]["uuid"]]
    assert gone["state"] == "failed" and "is gone from the service" in gone["error"]
    node = json.loads(cli("nodes", "show", gone["node"], "--json", state_dir=state_dir).stdout)
    assert "is gone from the service" in node["reason"]


def test_a_late_reset_is_waited_for(emulator, faults):
    """The emulator itself lands a Reset 1-11 s after accepting it; the proxy adds lag."""
    target = system_target(emulator, n=1, via=faults)
    drv = driver(power_wait=40.0)
    drv.set_power(target, "off")
    faults.delay = 0.3
    result = drv.set_power(target, "on")
    assert result.power == "on" and result.changed
    assert emulator.system(emulator.systems[1]["uuid"])["PowerState"] == "On"
    print(f"Reset On accepted, state reached after {result.seconds:.1f} s")


def test_rotation_through_the_account_service_is_checked_by_the_emulator(
    emulator, faults, tmp_path, state_dir
):
    faults.accounts = True
    file = creds(tmp_path, f"{USER}:{PASSWORD}")
    proc = cli("discover", faults.range, "--credentials", str(file), "--rotate", "--json",
               state_dir=state_dir)  # fmt: skip
    rows = json.loads(proc.stdout)
    assert {(r["rotated"], r["username"], r["error"]) for r in rows} == {(True, "metalseed", None)}
    store = SqliteStore(state_dir / "state.db", SecretBox(state_dir / "secret.key"))
    try:
        cred = store.get_credential(rows[0]["node"])
        assert {store.get_credential(r["node"]) for r in rows} == {cred}
        new_password = cred.password.reveal()
    finally:
        store.close()
    # the emulator itself accepts the new account (it reads the htpasswd file we wrote)
    response = requests.get(
        f"{emulator.url}/redfish/v1/Systems", auth=("metalseed", new_password), timeout=5
    )
    assert response.status_code == 200
    assert new_password not in proc.stdout + proc.stderr


def test_a_service_without_accounts_keeps_the_working_login_and_says_so(
    emulator, tmp_path, state_dir
):
    file = creds(tmp_path, f"{USER}:{PASSWORD}")
    proc = cli("discover", emulator.range, "--credentials", str(file), "--rotate", "--json",
               state_dir=state_dir, check=False)  # fmt: skip
    rows = json.loads(proc.stdout)
    assert {r["username"] for r in rows} == {USER} and not any(r["rotated"] for r in rows)
    assert all("refuses account creation" in r["error"] for r in rows)
    events = json.loads(cli("events", rows[0]["node"], "--json", state_dir=state_dir).stdout)
    assert any("refuses account creation" in e["message"] for e in events)


def test_the_orchestrator_netboots_redfish_machines(emulator, tmp_path, state_dir):
    file = creds(tmp_path, f"{USER}:{PASSWORD}")
    config = Config(
        state_dir=state_dir,
        bmc=BmcConfig(power_wait=40.0),
        run=dataclasses.replace(RunConfig(), tick=0.1),
    )
    cli("discover", emulator.range, "--credentials", str(file), state_dir=state_dir)
    cli("power", "off", "--all", state_dir=state_dir)
    store = SqliteStore(config.db_path, SecretBox(config.key_path))
    try:
        Orchestrator(config, store, Drivers(config.bmc)).tick()
        nodes = store.list_nodes()
        assert {n.state for n in nodes} == {NodeState.BOOTING}
    finally:
        store.close()
    for system in emulator.systems:
        seen = emulator.system(system["uuid"])
        assert seen["PowerState"] == "On"
        assert seen["Boot"]["BootSourceOverrideTarget"] == "Pxe"


@pytest.fixture(scope="module")
def tls_emulator(tmp_path_factory):
    emu = Emulator(tmp_path_factory.mktemp("sushy-tls"), "127.77.0.2", count=1, tls=True).start()
    yield emu
    emu.stop()


def test_https_is_checked_against_the_ca_file(tls_emulator, caplog):
    target = system_target(tls_emulator)
    assert driver(redfish_ca_file=tls_emulator.ca).power_state(target) == "off"
    started = time.monotonic()
    with pytest.raises(BmcTlsError, match="certificate is not trusted"):
        driver().power_state(target)  # the system's CAs do not know ours
    assert time.monotonic() - started < 2.0  # fatal: not retried
    with caplog.at_level(logging.WARNING, logger="bootstrap.power.redfish"):
        assert driver(redfish_verify=False).power_state(target) == "off"
    assert "NOT checked" in caplog.text


def test_no_password_in_debug_logs(emulator, faults, caplog):
    faults.accounts = True
    with caplog.at_level(logging.DEBUG):
        drv = driver()
        drv.power_state(system_target(emulator, via=faults))
        drv.ensure_user(system_target(emulator, via=faults), Credential("logcheck", "Log-Pw-123"))
    assert caplog.records
    assert PASSWORD not in caplog.text and "Log-Pw-123" not in caplog.text
