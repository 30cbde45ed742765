"""Redfish benchmark: ``power status --all`` of N emulated Systems vs a sequential curl loop.

The service is OpenStack's sushy-tools emulator (``sushy-emulator``, its fake
driver: no libvirt) on 127.0.10.1, with HTTP basic auth from a bcrypt htpasswd
file; it is started for the run and stopped by PID. Every password lives in a
0600 file: the credentials file metalseed reads, and a netrc file for curl.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import bcrypt

from .common import (
    BenchError,
    Login,
    Options,
    Row,
    Section,
    Timed,
    bench_env,
    best_median,
    fmt_s,
    metalseed_argv,
    private_file,
    proc_cpu_seconds,
    progress,
    python,
    stop_pid,
    timed_run,
    verdict,
    workdir,
    write_credentials,
)
from .ipmi import fmt_ms, json_rows, median

HOST = "127.0.10.1"
SYSTEMS = 16
QUICK_SYSTEMS = 4
RUNS = 5
QUICK_RUNS = 2
STARTUP_RUNS = 3
SUSHY = Path(sys.executable).parent / "sushy-emulator"
BCRYPT_ROUNDS = 4  # the emulator checks the password on every request; see the setup notes

#: One GET per System, sequential, each answer to its own file (no pipe, no parser
#: process per call); the login comes from the netrc file, not argv.
CURL_LOOP = r"""
netrc=$1 base=$2 out=$3; shift 3
n=0
for path in "$@"; do
  n=$((n + 1))
  curl -s --fail --netrc-file "$netrc" -o "$out/$n.json" "$base$path" || echo "failed $path"
done
"""

#: Werkzeug's access log line: ``127.0.10.1 - - [date] "GET /path HTTP/1.1" 200 -``
ACCESS = re.compile(r'"(GET|POST|PATCH|PUT|DELETE|HEAD) (\S+) HTTP/[\d.]+" (\d{3})')


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _systems(count: int) -> list[dict]:
    """Fake Systems for the emulator: odd ones on, so both states are read back."""
    return [
        {
            "uuid": str(uuid.UUID(int=(0xBE7C << 96) + n + 1)),
            "name": f"bench-{n + 1}",
            "power_state": "On" if n % 2 else "Off",
            "nics": [{"mac": f"52:54:00:be:7c:{n + 1:02x}"}],
        }
        for n in range(count)
    ]


class Emulator:
    """``sushy-emulator`` with ``systems`` on ``HOST``; a context manager, stopped by PID."""

    def __init__(self, work: Path, login: Login, systems: list[dict]) -> None:
        self.work = work
        self.login = login
        self.systems = systems
        self.port = _free_port(HOST)
        self.log = work / "emulator.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def range(self) -> str:
        return f"redfish+http://{HOST}:{self.port}"

    def __enter__(self) -> Emulator:
        if not SUSHY.exists():
            raise BenchError(f"{SUSHY} not found (pip install sushy-tools)")
        digest = bcrypt.hashpw(self.login.password.encode(), bcrypt.gensalt(BCRYPT_ROUNDS))
        htpasswd = private_file(
            self.work / "htpasswd", f"{self.login.username}:{digest.decode()}\n"
        )
        (self.work / "sushy-state").mkdir()
        conf = self.work / "emulator.conf"
        conf.write_text(
            "SUSHY_EMULATOR_FAKE_DRIVER = True\n"
            f"SUSHY_EMULATOR_FAKE_SYSTEMS = {json.dumps(self.systems)}\n"
            f"SUSHY_EMULATOR_AUTH_FILE = {str(htpasswd)!r}\n"
            f"SUSHY_EMULATOR_STATE_DIR = {str(self.work / 'sushy-state')!r}\n"
        )
        argv = [str(SUSHY), "--config", str(conf), "-i", HOST, "-p", str(self.port)]
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        try:
            self._wait_ready()
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._stop()

    def _stop(self) -> None:
        if self.proc is not None:
            stop_pid(self.proc)
            self.proc = None

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"sushy-emulator exited: {self.log.read_text()[-1500:]}")
            with contextlib.suppress(OSError):
                with socket.create_connection((HOST, self.port), timeout=0.2):
                    return
            time.sleep(0.1)
        raise BenchError(f"sushy-emulator did not listen in {timeout:.0f} s")

    def get(self, path: str) -> dict:
        """The emulator's own answer, read by the harness (not timed)."""
        token = base64.b64encode(f"{self.login.username}:{self.login.password}".encode())
        request = urllib.request.Request(
            self.url + path, headers={"Authorization": f"Basic {token.decode()}"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)

    def cpu_seconds(self) -> float:
        if self.proc is None or self.proc.poll() is not None:
            raise BenchError("sushy-emulator died")
        return proc_cpu_seconds(self.proc.pid)

    def requests(self) -> list[tuple[str, str, str]]:
        """Every request in the access log so far: (method, path, status)."""
        return ACCESS.findall(self.log.read_text(errors="replace"))


@contextlib.contextmanager
def _counting(emu: Emulator) -> Iterator[dict]:
    """Requests and emulator CPU over the ``with`` body, filled in on exit."""
    before, cpu = len(emu.requests()), emu.cpu_seconds()
    seen: dict = {}
    yield seen
    time.sleep(0.05)  # the access log line is written after the answer
    got = emu.requests()[before:]
    seen.update(requests=got, cpu=emu.cpu_seconds() - cpu)


def redfish_power(opts: Options) -> Section:
    """`power status --all` of N emulated Redfish Systems vs a sequential curl loop."""
    count = QUICK_SYSTEMS if opts.quick else SYSTEMS
    runs = QUICK_RUNS if opts.quick else RUNS
    with workdir("redfish") as work:
        login = write_credentials(work)
        progress(f"redfish: starting sushy-emulator with {count} Systems on {HOST}")
        with Emulator(work, login, _systems(count)) as emu:
            return _redfish_power(work, login, emu, runs)


def _redfish_power(work: Path, login: Login, emu: Emulator, runs: int) -> Section:
    count = len(emu.systems)
    members = [m["@odata.id"] for m in emu.get("/redfish/v1/Systems")["Members"]]
    truth = {p: emu.get(p)["PowerState"].lower() for p in members}
    by_uuid = {s["uuid"]: s for s in emu.systems}
    if len(members) != count or {emu.get(p)["UUID"] for p in members} != set(by_uuid):
        raise BenchError(f"the emulator lists {len(members)} Systems, not the {count} configured")

    state = work / "state"
    argv = [*metalseed_argv(), "--state-dir", str(state), "discover", emu.range]
    argv += ["--credentials", str(login.path), "--json"]
    enroll = timed_run(argv)
    rows = json_rows(enroll, "metalseed discover")
    bad = [r for r in rows if r.get("error") or r.get("state") != "enrolled"]
    if enroll.returncode != 0 or bad or sorted(r["guid"] for r in rows) != sorted(by_uuid):
        raise BenchError(
            f"discover: exit {enroll.returncode}, {len(rows)} rows for {count} Systems, "
            f"failed {[(r.get('guid'), r.get('error')) for r in bad[:3]]} {enroll.stderr[-500:]}"
        )
    progress(f"redfish: {count} Systems enrolled in {fmt_s(enroll.wall)}")

    # (a) metalseed power status --all --json
    status_argv = [*metalseed_argv(), "--state-dir", str(state), "power", "status", "--all"]
    status_argv.append("--json")
    ms: list[tuple[Timed, dict]] = []
    for i in range(runs):
        with _counting(emu) as seen:
            timed = timed_run(status_argv)
        out = json_rows(timed, "metalseed power status")
        powers = {_system_path(r["bmc"]): r["power"] for r in out if not r.get("error")}
        if timed.returncode != 0 or len(out) != count or powers != truth:
            raise BenchError(
                f"power status run {i + 1}: exit {timed.returncode}, {len(out)} rows, "
                f"{sum(1 for p in powers if powers[p] == truth.get(p))}/{count} agree with the "
                f"emulator; {[r.get('error') for r in out if r.get('error')][:2]}"
            )
        ms.append((timed, seen))
        progress(
            f"  metalseed power status run {i + 1}: {fmt_s(timed.wall)}, "
            f"{len(seen['requests'])} requests (emulator CPU {seen['cpu']:.2f} s)"
        )

    # (b) the peer: a sequential curl loop, one GET per System
    netrc = private_file(
        work / "netrc",
        f"machine {HOST} login {login.username} password {login.password}\n",
    )
    answers = work / "curl-out"
    answers.mkdir()
    loop_argv = ["bash", "-c", CURL_LOOP, "bash", str(netrc), emu.url, str(answers), *members]
    peer: list[tuple[Timed, dict]] = []
    for i in range(runs):
        for f in answers.iterdir():
            f.unlink()
        with _counting(emu) as seen:
            timed = timed_run(loop_argv, env=bench_env())
        got = {}
        for n, path in enumerate(members, start=1):
            with contextlib.suppress(OSError, ValueError, KeyError):
                got[path] = json.loads((answers / f"{n}.json").read_text())["PowerState"].lower()
        if timed.returncode != 0 or timed.stdout.strip() or got != truth:
            raise BenchError(
                f"curl loop run {i + 1}: exit {timed.returncode}, {len(got)}/{count} power "
                f"states read, {timed.stdout.strip()[:300]}"
            )
        peer.append((timed, seen))
        progress(f"  curl loop run {i + 1}: {fmt_s(timed.wall)}, {len(seen['requests'])} requests")

    imports = [
        timed_run([python(), "-c", "import bootstrap.cli, bootstrap.power.redfish"])
        .check("import bootstrap.power.redfish")
        .wall
        for _ in range(STARTUP_RUNS)
    ]
    return _section(emu, enroll, ms, peer, runs, median(imports))


def _ratio(peer: float, ours: float) -> str:
    """How much faster metalseed is, or how much slower."""
    return f"{peer / ours:.1f}x" if ours <= peer else f"{ours / peer:.1f}x slower"


def _system_path(bmc: str) -> str:
    """``/redfish/v1/Systems/ID`` of a node's ``redfish+http://HOST:PORT/...`` address."""
    return "/" + bmc.split("://", 1)[1].split("/", 1)[1]


def _section(emu, enroll, ms, peer, runs, startup) -> Section:
    count = len(emu.systems)
    ms_best, ms_med = best_median([t.wall for t, _ in ms])
    pe_best, pe_med = best_median([t.wall for t, _ in peer])
    ms_req = median(len(s["requests"]) for _, s in ms)
    pe_req = median(len(s["requests"]) for _, s in peer)
    ms_paths: dict[str, int] = {}
    for method, path, _ in ms[-1][1]["requests"]:
        key = f"{method} {re.sub(r'/Systems/[^/]+', '/Systems/ID', path)}"
        ms_paths[key] = ms_paths.get(key, 0) + 1
    section = Section(f"Redfish: power status of {count} emulated Systems, metalseed vs curl")
    section.setup = [
        f"Service: sushy-tools' `sushy-emulator` ({_sushy_version()}) with its fake driver "
        f"(`SUSHY_EMULATOR_FAKE_DRIVER = True`), {count} `SUSHY_EMULATOR_FAKE_SYSTEMS` "
        f"(every second one on), on {HOST}:{emu.port}, HTTP basic auth from a bcrypt "
        f"htpasswd file (`SUSHY_EMULATOR_AUTH_FILE`, cost {BCRYPT_ROUNDS}: the emulator "
        "checks the password on every request, and at a production cost that check alone "
        "would dominate every figure). Started for the run, stopped by PID.",
        f"Enrolled with `metalseed --state-dir D discover {emu.range} --credentials F --json`"
        f" ({count}/{count} Systems enrolled by UUID, {fmt_s(enroll.wall)}).",
        f"metalseed: `metalseed --state-dir D power status --all --json`, the whole CLI "
        f"process, {runs} runs; every run checked: {count} rows, no errors, each power state "
        "equal to the emulator's own `PowerState`.",
        f"Peer: a sequential bash loop of `curl -s --fail --netrc-file F -o OUT "
        f"{emu.url}/redfish/v1/Systems/ID` over the same {count} Systems (login in a 0600 "
        f"netrc file, not argv), {runs} runs; every answer's `PowerState` checked against "
        "the emulator's.",
    ]
    section.rows = [
        Row(
            f"`power status --all`, {count} Systems, best of {runs}",
            "faster than the curl loop",
            fmt_s(ms_best),
            f"{fmt_s(pe_best)} (curl loop)",
            _ratio(pe_best, ms_best),
            verdict(ms_best < pe_best),
        ),
        Row(
            f"`power status --all`, {count} Systems, median of {runs}",
            "faster than the curl loop",
            fmt_s(ms_med),
            f"{fmt_s(pe_med)} (curl loop)",
            _ratio(pe_med, ms_med),
            verdict(ms_med < pe_med),
        ),
        Row(
            "HTTP requests per run (the emulator's access log)",
            "—",
            f"{ms_req:.0f} ({ms_req / count:.1f} per System)",
            f"{pe_req:.0f} ({pe_req / count:.1f} per System)",
            "—",
            "—",
        ),
        Row(
            "power states correct (every System, equal to the emulator's)",
            "all",
            f"{count}/{count} in each of {runs} runs",
            f"{count}/{count} in each of {runs} runs",
            "—",
            "pass",
        ),
    ]
    ms_cpu = median(t.cpu for t, _ in ms)
    pe_cpu = median(t.cpu for t, _ in peer)
    ms_emu = median(s["cpu"] for _, s in ms)
    pe_emu = median(s["cpu"] for _, s in peer)
    requests = ", ".join(f"`{k}` x{v}" for k, v in sorted(ms_paths.items(), key=lambda kv: -kv[1]))
    section.notes = [
        "### Where the time goes\n\n"
        f"Start-up: `python -c 'import bootstrap.cli, bootstrap.power.redfish'` (click, "
        f"sushy, requests) takes {fmt_ms(startup)} (median of {STARTUP_RUNS}), "
        f"{startup / ms_med * 100:.0f}% of the median metalseed run, before any request; "
        f"the whole curl loop takes {fmt_ms(pe_med)}. Per System, metalseed opens a sushy "
        f"session and makes {ms_req / count:.1f} requests where curl makes "
        f"{pe_req / count:.1f}; one run's requests: {requests}. (The service root and "
        "the Systems collection are read once per System: the root by `sushy.Sushy()`, "
        "the collection as the authenticated read that proves the login.) Median CPU per "
        "run: metalseed "
        f"{ms_cpu:.2f} s in the client and {ms_emu:.2f} s in the emulator; the curl loop "
        f"{pe_cpu:.2f} s in bash and curl and {pe_emu:.2f} s in the emulator "
        f"({fmt_ms(pe_med / count)} wall per curl call). The emulator is one Python "
        "process (Flask's development server, a thread per request), so its time per "
        "request is a floor for both."
    ]
    return section


def _sushy_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"sushy-tools {version('sushy-tools')}, sushy {version('sushy')}"
    except PackageNotFoundError:
        return "version unknown"


BENCHMARKS = {"redfish-power": redfish_power}
