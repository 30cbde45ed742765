"""Discovery and power against a BMC nobody in this project wrote: OpenIPMI's ipmi_sim.

Every other functional test talks to metalseed's own simulator, which shares
metalseed's reading of the IPMI spec. Here the BMC is ``ipmi_sim`` (Debian
package ``openipmi``), configured from ``data/ipmi_sim/`` and checked with
``ipmitool``, so both ends of every comparison are someone else's code.

ipmi_sim behaviour these tests rely on (measured with OpenIPMI 2.0.33 /
ipmi_sim 1.0.13 and ipmitool 1.8.19):

* ``-n`` (no stdio) is what makes it run in the background. Without it
  ipmi_sim echoes the command file, prompts "> " and runs a console on stdin;
  with stdin on /dev/null it then aborts (``epoll_ctl: Operation not
  permitted``, ``sel_update_fd: Assertion `0' failed``, SIGABRT). It does not
  fork: the PID we start is the BMC, and it exits at once on SIGTERM. Startup
  errors go to stderr, later ones to syslog.
* ``-s STATEDIR`` must exist; users changed over IPMI persist in
  ``STATEDIR/ipmi_sim/<name>/users.mc20`` and then override lan.conf's.
* The ``guid`` line of the LAN section is sent verbatim as the Get System GUID
  answer; without it every RMCP+ login fails (the GUID is part of RAKP).
  ``mc_set_guid`` in the emu file does not change that answer.
* It never answers the sessionless Get Channel Cipher Suites that ipmitool
  sends before every ``-I lanplus`` login unless ``-C`` is given, so ipmitool
  prints "Unable to Get Channel Cipher Suites" after ~10 s of retries and only
  then logs in. ``-C 3`` (RAKP-HMAC-SHA1, what pyghmi falls back to) skips the
  query. It refuses suite 17 (SHA-256) correctly, so pyghmi falls back to 3.
* Chassis Control and Set System Boot Options answer 0xcc (invalid data
  field) unless channel 15 can power or an external ``chassis_control``
  program is configured; see lan.conf.in for the ``startcmd`` set-up that
  makes power on/off work with no such program. Boot options never work
  without that program.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import FACTORY_PASSWORD, FACTORY_USER, cli, stop_process

DATA = Path(__file__).resolve().parent / "data" / "ipmi_sim"
PORTS = range(6240, 6300)
#: What the ipmi_sim BMC reports as its system GUID (a well-formed version 4 UUID).
SYSTEM_GUID = uuid.UUID("6f1c3e2a-58d4-4b7e-9a15-2c7d0e8b4f93")
MACHINE_CMDLINE = b"sleep\x00600\x00"  # what lan.conf.in's startcmd execs

pytestmark = pytest.mark.skipif(
    not (shutil.which("ipmi_sim") and shutil.which("ipmitool")),
    reason="needs ipmi_sim (Debian openipmi) and ipmitool",
)


def _free_port(address: str) -> int:
    """A port in PORTS free on ``address`` for UDP (the BMC) and TCP (its VM socket)."""
    for port in PORTS:
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                udp.bind((address, port))
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                tcp.bind((address, port))
        except OSError:
            continue
        return port
    raise AssertionError(f"no free port in {PORTS.start}-{PORTS.stop - 1} on {address}")


class ForeignBmc:
    """One running ipmi_sim process and how to reach it."""

    def __init__(
        self,
        proc: subprocess.Popen,
        address: str,
        port: int,
        guid: uuid.UUID,
        wire_guid: bytes,
        password: str,
        workdir: Path,
        log: Path,
    ) -> None:
        self.proc = proc
        self.address = address
        self.port = port
        self.guid = guid
        self.wire_guid = wire_guid
        self.password = password
        self.workdir = workdir
        self.log = log

    @property
    def endpoint(self) -> str:
        return f"{self.address}:{self.port}"

    @property
    def machine_pidfile(self) -> Path:
        return self.workdir / "machine.pid"

    def ipmitool(
        self, *args: str, password: str | None = None, timeout: float = 30
    ) -> subprocess.CompletedProcess:
        # -C 3: see the module docstring (ipmi_sim never answers Get Channel
        # Cipher Suites). -E: the password comes from IPMI_PASSWORD, never argv.
        argv = ["ipmitool", "-I", "lanplus", "-C", "3", "-N", "1", "-R", "2"]
        argv += ["-H", self.address, "-p", str(self.port), "-U", FACTORY_USER, "-E", *args]
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "IPMI_PASSWORD": self.password if password is None else password,
        }
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)

    def power(self) -> str:
        """The power state as ipmitool reads it: 'on' or 'off'."""
        seen = self.ipmitool("power", "status")
        assert seen.returncode == 0, seen.stderr
        match = re.search(r"Chassis Power is (on|off)", seen.stdout)
        assert match, seen.stdout
        return match.group(1)

    def machine_pid(self) -> int | None:
        """PID of the process ipmi_sim started as "the machine", if it is running."""
        try:
            pid = int(self.machine_pidfile.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, ValueError, IndexError):
            return None
        return pid if cmdline == MACHINE_CMDLINE and state != "Z" else None

    def stop(self) -> None:
        """Stop ipmi_sim by PID, then the machine it may have started (it outlives ipmi_sim)."""
        stop_process(self.proc)
        pid = self.machine_pid()
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 5
            while self.machine_pid() == pid and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.machine_pid() == pid:
                os.kill(pid, signal.SIGKILL)


def _render_lan_conf(template: str, *, power_control: bool, **values: str) -> str:
    if not power_control:
        template = re.sub(
            r"^# BEGIN power-control\n.*?^# END power-control\n", "", template, flags=re.S | re.M
        )
    for name, value in values.items():
        template = template.replace(f"@{name}@", value)
    config_lines = [ln for ln in template.splitlines() if not ln.lstrip().startswith("#")]
    left = re.findall(r"@[A-Z_]+@", "\n".join(config_lines))
    assert not left, f"lan.conf.in placeholders not filled: {left}"
    return template


@pytest.fixture
def start_ipmi_sim(tmp_path: Path, addr_block: str) -> Iterator[Callable[..., ForeignBmc]]:
    """Start ipmi_sim processes (``start_ipmi_sim(...) -> ForeignBmc``); all stopped by PID."""
    started: list[ForeignBmc] = []

    def start(
        *,
        password: str = FACTORY_PASSWORD,
        guid: uuid.UUID = SYSTEM_GUID,
        guid_order: str = "ipmi",
        power_control: bool = True,
        address: str | None = None,
        port: int | None = None,
        timeout: float = 20,
    ) -> ForeignBmc:
        address = address or f"{addr_block}.1"
        port = port or _free_port(address)
        # IPMI order: the UUID's 16 bytes reversed; SMBIOS order: first three fields
        # little-endian (what many real BMCs send). bootstrap/guid.py reads both.
        wire = guid.bytes[::-1] if guid_order == "ipmi" else guid.bytes_le
        workdir = tmp_path / f"ipmi_sim-{len(started)}"
        statedir = workdir / "state"
        statedir.mkdir(parents=True)
        lan_conf = workdir / "lan.conf"
        lan_conf.touch(mode=0o600)
        lan_conf.write_text(
            _render_lan_conf(
                (DATA / "lan.conf.in").read_text(),
                power_control=power_control,
                ADDRESS=address,
                PORT=str(port),
                GUID_HEX=wire.hex(),
                USERNAME=FACTORY_USER,
                PASSWORD=password,
                MACHINE_PIDFILE=str(workdir / "machine.pid"),
            )
        )
        log = workdir / "ipmi_sim.log"
        argv = ["ipmi_sim", "-c", str(lan_conf), "-f", str(DATA / "bmc.emu")]
        argv += ["-s", str(statedir), "-n"]
        with log.open("w") as log_fh:
            # -n and stdin on /dev/null: no console (see the module docstring)
            proc = subprocess.Popen(
                argv, cwd=workdir, stdin=subprocess.DEVNULL, stdout=log_fh, stderr=subprocess.STDOUT
            )
        bmc = ForeignBmc(proc, address, port, guid, wire, password, workdir, log)
        started.append(bmc)
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"ipmi_sim exited {proc.returncode}: {log.read_text()}")
            if bmc.ipmitool("mc", "info", timeout=10).returncode == 0:
                return bmc
            if time.monotonic() > deadline:
                raise AssertionError(f"ipmi_sim at {bmc.endpoint} not answering: {log.read_text()}")
            time.sleep(0.1)

    yield start
    for bmc in reversed(started):
        bmc.stop()


@pytest.fixture
def foreign_bmc(start_ipmi_sim) -> ForeignBmc:
    return start_ipmi_sim()


def _discover(target: str, creds_file: Path, state_dir: Path) -> list[dict]:
    out = cli("discover", target, "--credentials", str(creds_file), "--json", state_dir=state_dir)
    _no_traceback(out)
    return json.loads(out.stdout)


def _no_traceback(proc: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr


# -- a. discovery -------------------------------------------------------------------------


@pytest.mark.peer
@pytest.mark.parametrize("guid_order", ["ipmi", "smbios"])
def test_discover_enrolls_ipmi_sim_with_its_guid(start_ipmi_sim, creds_file, state_dir, guid_order):
    bmc = start_ipmi_sim(guid_order=guid_order)
    # what ipmi_sim really sends: the configured bytes, verbatim
    raw = bmc.ipmitool("raw", "0x06", "0x37")
    assert raw.returncode == 0, raw.stderr
    assert bytes.fromhex("".join(raw.stdout.split())) == bmc.wire_guid
    # ipmitool 1.8.19 guesses the byte order too ("GUID Encoding : IPMI", or "SMBIOS
    # (WARNING: IPMI Specification violation!)") and prints the same text for both
    shown = bmc.ipmitool("mc", "guid")
    assert re.search(rf"System GUID\s*:\s*{bmc.guid}\b", shown.stdout), shown.stdout
    assert re.search(rf"GUID Encoding\s*:\s*{guid_order}\b", shown.stdout, re.I), shown.stdout

    out = cli(
        "discover", bmc.endpoint, "--credentials", str(creds_file), "--json", state_dir=state_dir
    )
    _no_traceback(out)
    found = json.loads(out.stdout)
    assert len(found) == 1, found
    row = found[0]
    assert row["bmc"] == bmc.endpoint
    assert row["state"] == "enrolled"
    assert row["error"] is None
    assert row["username"] == FACTORY_USER
    assert row["guid"] == str(bmc.guid)
    assert row["power"] == bmc.power() == "off"

    # the identity metalseed stored is what ipmitool reads from Get Device ID
    node = json.loads(cli("nodes", "show", row["node"], "--json", state_dir=state_dir).stdout)
    info = bmc.ipmitool("mc", "info").stdout
    assert re.search(
        rf"Firmware Revision\s*:\s*{re.escape(node['facts']['firmware'])}$", info, re.M
    )
    assert re.search(rf"Manufacturer ID\s*:\s*{node['facts']['manufacturer_id']}$", info, re.M)
    assert re.search(rf"Product ID\s*:\s*{node['facts']['product_id']}\b", info, re.M)


@pytest.mark.peer
def test_discover_sweep_finds_exactly_the_one_ipmi_sim(start_ipmi_sim, creds_file, state_dir):
    bmc = start_ipmi_sim()
    # 30 loopback addresses, one BMC: the other 29 answer nothing (or ICMP unreachable)
    net = bmc.address.rsplit(".", 1)[0] + ".0/27"
    out = cli(
        "discover",
        f"{net}:{bmc.port}",
        "--credentials",
        str(creds_file),
        "--json",
        state_dir=state_dir,
    )
    found = json.loads(out.stdout)
    assert [(r["bmc"], r["state"], r["guid"]) for r in found] == [
        (bmc.endpoint, "enrolled", str(bmc.guid))
    ]


# -- b. power status ----------------------------------------------------------------------


@pytest.mark.peer
def test_power_status_matches_ipmitool(foreign_bmc, creds_file, state_dir):
    bmc = foreign_bmc
    _discover(bmc.endpoint, creds_file, state_dir)

    def metalseed_power() -> str:
        out = cli("power", "status", "--all", "--json", state_dir=state_dir)
        _no_traceback(out)
        rows = json.loads(out.stdout)
        assert [(r["bmc"], r["error"]) for r in rows] == [(bmc.endpoint, None)]
        return rows[0]["power"]

    assert metalseed_power() == bmc.power() == "off"
    # ipmitool, not metalseed, changes the state; metalseed must read the change
    turned = bmc.ipmitool("power", "on")
    assert turned.returncode == 0, f"ipmi_sim cannot power on: {turned.stderr}"
    assert bmc.power() == "on"
    assert metalseed_power() == "on"


# -- c. wrong password --------------------------------------------------------------------


@pytest.mark.peer
def test_wrong_password_is_a_clear_refusal(foreign_bmc, tmp_path, state_dir):
    bmc = foreign_bmc
    wrong = tmp_path / "wrong-credentials"
    wrong.write_text(f"{FACTORY_USER}:not-{FACTORY_PASSWORD}\n")
    wrong.chmod(0o600)
    # ipmitool agrees the password is wrong
    assert bmc.ipmitool("mc", "info", password=f"not-{FACTORY_PASSWORD}").returncode != 0

    out = cli(
        "discover",
        bmc.endpoint,
        "--credentials",
        str(wrong),
        "--json",
        state_dir=state_dir,
        check=False,
    )
    _no_traceback(out)
    assert out.returncode != 0
    found = json.loads(out.stdout)
    assert len(found) == 1, found
    row = found[0]
    assert row["bmc"] == bmc.endpoint
    assert row["state"] == "discovered"
    assert row["guid"] is None
    assert "refused" in row["error"] and FACTORY_USER in row["error"], row["error"]

    table = cli(
        "discover", bmc.endpoint, "--credentials", str(wrong), state_dir=state_dir, check=False
    )
    _no_traceback(table)
    assert table.returncode != 0
    line = next(ln for ln in table.stdout.splitlines() if bmc.endpoint in ln)
    assert "refused" in line, table.stdout
    assert FACTORY_PASSWORD not in table.stdout + table.stderr + out.stdout + out.stderr


@pytest.mark.peer
def test_stored_login_refused_later_names_the_bmc(start_ipmi_sim, creds_file, state_dir):
    bmc = start_ipmi_sim()
    _discover(bmc.endpoint, creds_file, state_dir)
    # Someone changes the BMC's admin password behind metalseed's back: the same
    # machine (same GUID, same address) now refuses the stored login.
    bmc.stop()
    start_ipmi_sim(password="changed-Pw-8", address=bmc.address, port=bmc.port)

    out = cli("power", "status", "--all", "--json", state_dir=state_dir, check=False)
    _no_traceback(out)
    assert out.returncode != 0
    rows = json.loads(out.stdout)
    assert len(rows) == 1 and rows[0]["bmc"] == bmc.endpoint
    assert f"BMC {bmc.endpoint} refused the login for user '{FACTORY_USER}'" in rows[0]["error"]


# -- d. power on / off --------------------------------------------------------------------


@pytest.mark.peer
def test_power_on_and_off_through_ipmi_sim(foreign_bmc, creds_file, state_dir):
    bmc = foreign_bmc
    found = _discover(bmc.endpoint, creds_file, state_dir)
    node = found[0]["node"]
    assert bmc.power() == "off" and bmc.machine_pid() is None

    out = cli("power", "on", node, "--json", state_dir=state_dir, check=False)
    _no_traceback(out)
    # ipmi_sim only powers on with lan.conf's 'serial 15 ... codec VM' + 'startcmd'
    # (the fixture's default); without them it answers 0xcc, tested further down.
    assert out.returncode == 0, out.stdout + out.stderr
    [row] = json.loads(out.stdout)
    assert (row["power"], row["changed"], row["error"]) == ("on", True, None)
    assert bmc.power() == "on"
    assert bmc.machine_pid() is not None  # ipmi_sim really started "the machine"

    out = cli("power", "off", node, "--json", state_dir=state_dir)
    [row] = json.loads(out.stdout)
    assert (row["power"], row["changed"]) == ("off", True)
    assert bmc.power() == "off"
    assert bmc.machine_pid() is None


@pytest.mark.peer
def test_bmc_without_power_control_gives_clear_errors(start_ipmi_sim, creds_file, state_dir):
    """Plain ipmi_sim (no startcmd, no chassis program) refuses power and boot device."""
    bmc = start_ipmi_sim(power_control=False)
    assert bmc.ipmitool("power", "on").returncode != 0  # ipmitool is refused too
    found = _discover(bmc.endpoint, creds_file, state_dir)
    node = found[0]["node"]
    for args, doing in (
        (("power", "on"), "power on failed"),
        (("boot-device", "pxe"), "set boot device pxe failed"),
    ):
        out = cli(*args, node, "--json", state_dir=state_dir, check=False)
        _no_traceback(out)
        assert out.returncode != 0
        [row] = json.loads(out.stdout)
        assert row["bmc"] == bmc.endpoint
        # completion code 0xcc as pyghmi words it
        expected = f"BMC {bmc.endpoint}: {doing}: Invalid data field in request"
        assert expected in row["error"], row["error"]
    assert bmc.power() == "off"


# -- credential rotation on a foreign BMC -------------------------------------------------


@pytest.mark.peer
def test_rotation_creates_a_working_user_on_ipmi_sim(foreign_bmc, creds_file, state_dir):
    bmc = foreign_bmc
    out = cli(
        "discover",
        bmc.endpoint,
        "--credentials",
        str(creds_file),
        "--rotate",
        "--json",
        state_dir=state_dir,
    )
    [row] = json.loads(out.stdout)
    assert (row["state"], row["username"], row["rotated"], row["error"]) == (
        "enrolled",
        "metalseed",
        True,
        None,
    )
    users = bmc.ipmitool("user", "list", "1")
    assert re.search(r"^3\s+metalseed\s+.*ADMINISTRATOR", users.stdout, re.M), users.stdout
    # the next command logs in with the rotated password only
    status = json.loads(cli("power", "status", "--all", "--json", state_dir=state_dir).stdout)
    assert [(r["power"], r["error"]) for r in status] == [("off", None)]
    shown = json.loads(cli("nodes", "show", row["node"], "--json", state_dir=state_dir).stdout)
    assert shown["bmc_user"] == "metalseed"
