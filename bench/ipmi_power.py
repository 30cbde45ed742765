"""IPMI benchmark: ``power status --all`` of 256 simulated BMCs vs FreeIPMI's ipmipower
and a sequential ipmitool loop.

Runs against ``metalseed lab bmc`` on 127.0.5.x-127.0.6.x; see :mod:`bench.ipmi`
for the shared pieces and the child-process helpers it times in-process with.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
from pathlib import Path

from .common import (
    BenchError,
    Login,
    Options,
    Row,
    Section,
    Simulator,
    Timed,
    bench_env,
    best_median,
    bmc_simulator,
    fmt_s,
    metalseed_argv,
    private_file,
    progress,
    python,
    timed_run,
    verdict,
    workdir,
    write_credentials,
)
from .ipmi import (
    check_enrolled,
    count_nodes,
    discover,
    fmt_ms,
    json_rows,
    median,
)

POWER_BMCS = 256
POWER_FIRST = "127.0.5.1"
POWER_PORT = 623
POWER_RUNS = 5
POWER_TARGET_SPEEDUP = 50.0
STARTUP_RUNS = 5
IPMIPOWER = "ipmipower"
IPMIPOWER_RUNS = 5
DRIVER_CONCURRENCY = (64, 128)  # 64 as asked; 128 is the CLI's default (bmc.concurrency)
DRIVER_REPEAT = 5


def _covering_range(endpoints: list[str]) -> str:
    """``FIRST-LAST:PORT`` over consecutive addresses (a CIDR would skip .255 and .0)."""
    hosts = sorted((ipaddress.IPv4Address(e.rsplit(":", 1)[0]) for e in endpoints), key=int)
    port = endpoints[0].rsplit(":", 1)[1]
    return f"{hosts[0]}-{hosts[-1]}:{port}"


def _hostrange(endpoints: list[str]) -> str:
    """FreeIPMI hostranges over ``ADDR:PORT`` endpoints: ``127.0.5.[1-255]:623,127.0.6.[0]:623``."""
    by_prefix: dict[tuple[str, str], list[int]] = {}
    for endpoint in endpoints:
        host, port = endpoint.rsplit(":", 1)
        prefix, last = host.rsplit(".", 1)
        by_prefix.setdefault((prefix, port), []).append(int(last))
    parts = []
    for (prefix, port), lasts in sorted(by_prefix.items()):
        runs: list[list[int]] = []
        for n in sorted(set(lasts)):
            if runs and n == runs[-1][1] + 1:
                runs[-1][1] = n
            else:
                runs.append([n, n])
        spans = ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
        parts.append(f"{prefix}.[{spans}]:{port}")
    return ",".join(parts)


def _startup(label: str, argv: list[str]) -> tuple[float, float]:
    runs = [timed_run(argv).check(label).wall for _ in range(STARTUP_RUNS)]
    best, med = best_median(runs)
    progress(f"  {label}: best {fmt_ms(best)}, median {fmt_ms(med)}")
    return best, med


# -- benchmark 1: power status of 256 BMCs vs an ipmitool loop ----------------------------


IPMITOOL_LOOP = r"""
while read -r host port; do
  printf '%s:%s ' "$host" "$port"
  ipmitool -I lanplus -H "$host" -p "$port" -U "$BENCH_USER" -E power status 2>&1
done < "$1"
"""


def power_status(opts: Options) -> Section:
    """`power status --all` of 256 simulated BMCs vs ipmipower and a sequential ipmitool loop."""
    del opts  # the same runs in --quick mode: the ipmitool loop dominates anyway
    with workdir("power") as work:
        login = write_credentials(work)
        progress(f"power: starting {POWER_BMCS} simulated BMCs from {POWER_FIRST}:{POWER_PORT}")
        with bmc_simulator(
            work,
            login,
            "--count",
            str(POWER_BMCS),
            "--address",
            POWER_FIRST,
            "--port",
            str(POWER_PORT),
        ) as sim:
            if len(sim.endpoints) != POWER_BMCS:
                raise BenchError(f"simulator serves {len(sim.endpoints)} BMCs, not {POWER_BMCS}")
            return _power_status(work, login, sim)


def _power_status(work: Path, login: Login, sim: Simulator) -> Section:
    state = work / "state"
    ranges = [_covering_range(sim.endpoints)]
    progress(f"power: enrolling with `discover {' '.join(ranges)}`")
    enroll, rows = discover(state, login, ranges)
    check_enrolled(rows, sim, "enrollment")
    if (n := count_nodes(state)) != POWER_BMCS:
        raise BenchError(f"enrollment: the store holds {n} nodes, not {POWER_BMCS}")
    progress(f"power: {len(rows)} BMCs enrolled in {fmt_s(enroll.wall)}")

    # (a) metalseed power status --all --json, the whole CLI process
    status_argv = [*metalseed_argv(), "--state-dir", str(state), "power", "status", "--all"]
    status_argv.append("--json")
    runs: list[tuple[Timed, float]] = []
    powers: dict[str, str] = {}
    for i in range(POWER_RUNS):
        sim_before = sim.cpu_seconds()
        timed = timed_run(status_argv)
        sim_cpu = sim.cpu_seconds() - sim_before
        out = json_rows(timed, "metalseed power status")
        errors = [r for r in out if r.get("error")]
        if timed.returncode != 0 or errors or len(out) != POWER_BMCS:
            raise BenchError(
                f"power status run {i + 1}: exit {timed.returncode}, {len(out)} rows, "
                f"{len(errors)} errors, e.g. {errors[:2]} {timed.stderr[-500:]}"
            )
        if {r["bmc"] for r in out} != set(sim.endpoints):
            raise BenchError(f"power status run {i + 1}: rows do not match the simulator's BMCs")
        powers = {r["bmc"]: r["power"] for r in out}
        runs.append((timed, sim_cpu))
        progress(
            f"  metalseed power status run {i + 1}: {fmt_s(timed.wall)} "
            f"(client CPU {timed.cpu:.2f} s, simulator CPU {sim_cpu:.2f} s)"
        )
    walls = [t.wall for t, _ in runs]
    ms_best, ms_med = best_median(walls)

    # (b) the peer: FreeIPMI's ipmipower, one C process polling all BMCs at once
    peer_runs = _ipmipower_runs(work, login, sim, powers)
    pp_best, pp_med = best_median([t.wall for t, _ in peer_runs])

    # (c) the other peer: a shell loop of ipmitool, one process and one session per BMC
    hosts = work / "hosts"
    hosts.write_text("".join(f"{e.replace(':', ' ')}\n" for e in sim.endpoints))
    progress(f"power: ipmitool loop over {POWER_BMCS} BMCs (sequential, ~8 s)")
    sim_before = sim.cpu_seconds()
    loop = timed_run(
        ["bash", "-c", IPMITOOL_LOOP, "bash", str(hosts)],
        env=bench_env(IPMI_PASSWORD=login.password, BENCH_USER=login.username),
    )
    loop_sim_cpu = sim.cpu_seconds() - sim_before
    seen: dict[str, str] = {}
    for line in loop.stdout.splitlines():
        bmc, _, text = line.partition(" ")
        if text.startswith("Chassis Power is "):
            seen[bmc] = text.removeprefix("Chassis Power is ").strip()
    if set(seen) != set(sim.endpoints):
        bad = [ln for ln in loop.stdout.splitlines() if "Chassis Power is" not in ln]
        raise BenchError(f"ipmitool loop: {len(seen)} of {POWER_BMCS} answered; e.g. {bad[:3]}")
    disagree = [b for b in seen if seen[b] != powers.get(b)]
    if disagree:
        raise BenchError(f"ipmitool and metalseed disagree on power for {disagree[:5]}")
    progress(f"  ipmitool loop: {fmt_s(loop.wall)} ({fmt_ms(loop.wall / POWER_BMCS)} per call)")

    # where metalseed's time goes
    progress("power: breakdown (start-up, in-process driver and command body)")
    startup = {
        "python -c pass": _startup("python -c pass", [python(), "-c", "pass"]),
        "python -c 'import bootstrap.cli'": _startup(
            "python -c 'import bootstrap.cli'", [python(), "-c", "import bootstrap.cli"]
        ),
        "python -c 'import bootstrap.cli, bootstrap.power.ipmi'": _startup(
            "python -c 'import bootstrap.cli, bootstrap.power.ipmi'",
            [python(), "-c", "import bootstrap.cli, bootstrap.power.ipmi"],
        ),
        "metalseed --help": _startup("metalseed --help", [*metalseed_argv(), "--help"]),
        "metalseed nodes list --json": _startup(
            "metalseed nodes list --json",
            [*metalseed_argv(), "--state-dir", str(state), "nodes", "list", "--json"],
        ),
    }
    child = timed_run(
        [python(), "-m", "bench.ipmi", "driver-timing", "--state-dir", str(state)]
        + ["--sim-pid", str(sim.pid), "--repeat", str(DRIVER_REPEAT)]
        + [arg for c in DRIVER_CONCURRENCY for arg in ("--concurrency", str(c))]
    ).check("driver timing")
    inproc = json.loads(child.stdout)
    for p in inproc["passes"]:
        if any(r["errors"] for r in p["reps"]) or p["rows"] != POWER_BMCS:
            raise BenchError(f"in-process {p['what']}: {p['rows']} rows, errors in {p['reps']}")
        b, m = best_median([r["wall"] for r in p["reps"]])
        progress(f"  in-process {p['what']}: best {fmt_s(b)}, median {fmt_s(m)}")
    phases = _cli_breakdown_runs(work, state)
    pen_probe = _pen_probe(work, login, sim.endpoints)
    if pen_probe:
        progress(
            f"  ipmitool per call: {fmt_ms(pen_probe[0])} as installed, "
            f"{fmt_ms(pen_probe[1])} with the PEN registry masked"
        )

    # the table
    speed_best = loop.wall / ms_best
    speed_med = loop.wall / ms_med
    per_call = loop.wall / POWER_BMCS
    section = Section(f"Power status of {POWER_BMCS} simulated BMCs")
    section.setup = [
        f"Simulator: `metalseed lab bmc --count {POWER_BMCS} --address {POWER_FIRST} "
        f"--port {POWER_PORT}` as its own process (PID-tracked), BMCs "
        f"{sim.endpoints[0]} .. {sim.endpoints[-1]}, all powered off.",
        f"Enrolled with `metalseed --state-dir D discover {' '.join(ranges)} --credentials F` "
        f"({POWER_BMCS}/{POWER_BMCS} BMCs enrolled, {fmt_s(enroll.wall)}). A range, not "
        "`127.0.5.0/24 127.0.6.0/24`: CIDRs skip their network and broadcast addresses, so "
        "the BMCs on 127.0.5.255 and 127.0.6.0 would be missed (254 enrolled).",
        f"metalseed: `metalseed --state-dir D power status --all --json`, the whole CLI "
        f"process, {POWER_RUNS} runs; every run checked for {POWER_BMCS} rows, no errors, "
        "the simulator's exact BMC set.",
        f"Peer 1: FreeIPMI's ipmipower ({_ipmipower_version()}), `ipmipower --config-file F "
        f"-D LAN_2_0 -h '{_hostrange(sim.endpoints)}' --stat --fanout {POWER_BMCS}`, "
        f"{IPMIPOWER_RUNS} runs, in the same run against the same simulator; username and "
        "password in F (0600, freeipmi.conf's `username`/`password` keys), not in argv. A "
        f"run counts only if all {POWER_BMCS} BMCs have an `on`/`off` line, each agreeing "
        "with metalseed's.",
        "Peer 2: a sequential bash loop of `ipmitool -I lanplus -H ADDR -p 623 -U admin -E "
        f"power status` over the same {POWER_BMCS} BMCs (password in `IPMI_PASSWORD`), 1 run; "
        "every answer checked and compared with metalseed's.",
    ]
    section.rows = [
        Row(
            f"`power status --all`, {POWER_BMCS} BMCs, best of {POWER_RUNS}",
            f">= {POWER_TARGET_SPEEDUP:.0f}x faster than the ipmitool loop",
            fmt_s(ms_best),
            f"{fmt_s(loop.wall)} (ipmitool loop)",
            f"{speed_best:.1f}x",
            verdict(speed_best >= POWER_TARGET_SPEEDUP),
        ),
        Row(
            f"`power status --all`, {POWER_BMCS} BMCs, median of {POWER_RUNS}",
            f">= {POWER_TARGET_SPEEDUP:.0f}x faster than the ipmitool loop",
            fmt_s(ms_med),
            f"{fmt_s(loop.wall)} (ipmitool loop)",
            f"{speed_med:.1f}x",
            verdict(speed_med >= POWER_TARGET_SPEEDUP),
        ),
        Row(
            f"`power status --all` vs ipmipower, best of {POWER_RUNS} / {IPMIPOWER_RUNS}",
            "— (issue 12: know where the time goes)",
            fmt_s(ms_best),
            f"{fmt_s(pp_best)} (ipmipower)",
            f"{ms_best / pp_best:.1f}x slower",
            "—",
        ),
        Row(
            f"`power status --all` vs ipmipower, median of {POWER_RUNS} / {IPMIPOWER_RUNS}",
            "— (issue 12: know where the time goes)",
            fmt_s(ms_med),
            f"{fmt_s(pp_med)} (ipmipower)",
            f"{ms_med / pp_med:.1f}x slower",
            "—",
        ),
        Row(
            f"time per BMC (wall / {POWER_BMCS})",
            "—",
            f"{fmt_ms(ms_med / POWER_BMCS)} (median run)",
            f"{fmt_ms(per_call)} per ipmitool call",
            f"{per_call / (ms_med / POWER_BMCS):.1f}x",
            "—",
        ),
        Row(
            f"rows correct ({POWER_BMCS} rows, no errors, agrees with ipmipower and ipmitool)",
            "all",
            f"{POWER_BMCS}/{POWER_BMCS} in each of {POWER_RUNS} runs",
            f"ipmipower {POWER_BMCS}/{POWER_BMCS} in each of {IPMIPOWER_RUNS} runs; "
            f"ipmitool {len(seen)}/{POWER_BMCS}",
            "—",
            "pass",
        ),
    ]
    section.notes = [
        _power_notes(
            runs=runs,
            loop=loop,
            loop_sim_cpu=loop_sim_cpu,
            peer_runs=peer_runs,
            startup=startup,
            inproc=inproc,
            phases=phases,
            pen_probe=pen_probe,
        )
    ]
    return section


def _ipmipower_version() -> str:
    proc = subprocess.run([IPMIPOWER, "--version"], capture_output=True, text=True, timeout=10)
    return (proc.stdout.strip().splitlines() or ["version unknown"])[0]


def _ipmipower_runs(
    work: Path, login: Login, sim: Simulator, powers: dict[str, str]
) -> list[tuple[Timed, float]]:
    """``ipmipower --stat`` over the simulator's BMCs, ``IPMIPOWER_RUNS`` times.

    The login goes in a 0600 freeipmi.conf-format file given with ``--config-file``
    (``username``/``password`` keys), never in argv. A run counts only if every BMC
    has an ``on``/``off`` line and each agrees with metalseed's reading.
    """
    if shutil.which(IPMIPOWER) is None:
        raise BenchError(f"{IPMIPOWER} is not installed (Debian: freeipmi-tools)")
    config = private_file(
        work / "ipmipower.conf", f"username {login.username}\npassword {login.password}\n"
    )
    hostrange = _hostrange(sim.endpoints)
    argv = [IPMIPOWER, "--config-file", str(config), "-D", "LAN_2_0", "-h", hostrange]
    argv += ["--stat", "--fanout", str(POWER_BMCS)]
    port = {e.rsplit(":", 1)[1] for e in sim.endpoints}.pop()
    runs = []
    for i in range(IPMIPOWER_RUNS):
        sim_before = sim.cpu_seconds()
        timed = timed_run(argv)
        sim_cpu = sim.cpu_seconds() - sim_before
        seen: dict[str, str] = {}
        other: list[str] = []
        for line in timed.stdout.splitlines():
            host, _, answer = line.rpartition(": ")
            if answer in ("on", "off"):
                seen[f"{host}:{port}"] = answer
            else:
                other.append(line)
        if timed.returncode != 0 or set(seen) != set(sim.endpoints) or other:
            raise BenchError(
                f"ipmipower run {i + 1}: exit {timed.returncode}, {len(seen)} of "
                f"{POWER_BMCS} BMCs reported on/off; e.g. {other[:3]} {timed.stderr[-300:]}"
            )
        disagree = [b for b in seen if seen[b] != powers.get(b)]
        if disagree:
            raise BenchError(f"ipmipower and metalseed disagree on power for {disagree[:5]}")
        runs.append((timed, sim_cpu))
        progress(
            f"  ipmipower run {i + 1}: {fmt_s(timed.wall)} (CPU {timed.cpu:.2f} s, "
            f"simulator CPU {sim_cpu:.2f} s), {len(seen)}/{POWER_BMCS} on/off lines"
        )
    return runs


PEN_FILE = Path("/usr/share/misc/enterprise-numbers.txt")


#: ``metalseed power status --all --json`` through ``main()`` with timers, run as
#: ``python -c CLI_BREAKDOWN STATE_DIR OUT``. Nothing but ``time`` and ``sys`` is imported
#: before ``bootstrap.cli``; the driver classes are wrapped when ``driver_for`` first
#: builds them (so pyghmi is imported where the CLI imports it). Main-thread phases are
#: time.time() marks; calls made on the worker threads (logins, commands, logouts, store
#: reads and writes) are summed per kind, in thread-seconds. The CLI's JSON goes to
#: stdout, the measurements to OUT.
CLI_BREAKDOWN = """
import time
t_start = time.time()
import sys
state_dir, out = sys.argv[1], sys.argv[2]
import bootstrap.cli as cli
from bootstrap import actions, power
from bootstrap.store.sqlite import SqliteStore
import threading
marks = {"start": t_start, "imported": time.time()}
calls = {}
lock = threading.Lock()

def timed(kind, fn, main=False):
    def wrapper(*a, **kw):
        t0 = time.time()
        try:
            return fn(*a, **kw)
        finally:
            dt = time.time() - t0
            with lock:
                n, total = calls.get(kind, (0, 0.0))
                calls[kind] = (n + 1, total + dt)
    return wrapper

def first_connect(fn):
    def wrapper(self):
        if self._conn is not None:
            return fn(self)
        t0 = time.time()
        try:
            return fn(self)
        finally:
            marks["store_connect"] = marks.get("store_connect", 0.0) + time.time() - t0
    return wrapper

wrapped = set()
def driver_for(name, *a, **kw):
    t0 = time.time()
    driver = build(name, *a, **kw)
    with lock:
        cls = type(driver)
        if cls not in wrapped:
            wrapped.add(cls)
            cls._connect = timed("login", cls._connect)
            cls._get_power = timed("command", cls._get_power)
            cls._disconnect = timed("logout", cls._disconnect)
    dt = time.time() - t0
    with lock:
        n, total = calls.get("driver set-up", (0, 0.0))
        calls["driver set-up"] = (n + 1, total + dt)
    return driver

build = power.driver_for
power.driver_for = driver_for
SqliteStore._connect = first_connect(SqliteStore._connect)
SqliteStore.get_credential = timed("store read", SqliteStore.get_credential)
SqliteStore.update_node = timed("store write", SqliteStore.update_node)
SqliteStore.add_event = timed("store write", SqliteStore.add_event)
power.Drivers.power_state = timed("power_state", power.Drivers.power_state)
for name in ("open_store", "resolve_nodes", "power"):
    fn = getattr(actions, name)
    def main_phase(*a, _fn=fn, _name=name, **kw):
        t0 = time.time()
        try:
            return _fn(*a, **kw)
        finally:
            marks[_name] = time.time() - t0
    setattr(actions, name, main_phase)
sys.argv = ["metalseed", "--state-dir", state_dir, "power", "status", "--all", "--json"]
code = 0
try:
    cli.main()
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else 1
sys.stdout.flush()
marks["main_end"] = time.time()
import json
with open(out, "w") as fh:
    json.dump({"marks": marks, "calls": calls}, fh)
sys.exit(code)
"""


STORE_KINDS = ("store read", "store write")
DRIVER_KINDS = ("driver set-up", "login", "command", "logout")
MAIN_PHASES = (
    "interpreter start",
    "import",
    "store open",
    "resolve nodes",
    "body",
    "rest of main",
    "exit",
)

#: worker-thread kinds in CLI_BREAKDOWN's ``calls``, with the words the report uses
WORKER_KINDS = (
    ("driver set-up", "driver set-up: `import pyghmi`, build the IPMI driver"),
    ("login", "logins: RMCP+ Open Session, RAKP 1-4 (pyghmi `Command()`)"),
    ("command", "commands: Get Chassis Status"),
    ("logout", "logouts: Close Session"),
    ("store read", "store reads: each node's credential, decrypted"),
    ("store write", "store writes (only a changed power state writes)"),
)


def _cli_breakdown_runs(work: Path, state: Path) -> dict:
    """Median phases of ``power status --all --json`` run through an instrumented ``main()``.

    Main-thread phases in seconds of wall; ``workers`` holds, per kind of call made
    on the worker threads, (calls, thread-seconds, share of the workers' time, the
    wall time that share is of the body).
    """
    out = work / "breakdown.json"
    runs = []
    for i in range(POWER_RUNS):
        timed = timed_run([python(), "-c", CLI_BREAKDOWN, str(state), str(out)])
        rows = json_rows(timed, "instrumented power status")
        if timed.returncode != 0 or len(rows) != POWER_BMCS or any(r["error"] for r in rows):
            raise BenchError(f"instrumented power status run {i + 1} failed: {timed.stderr}")
        data = json.loads(out.read_text())
        m, calls = data["marks"], data["calls"]
        connect = m.get("store_connect", 0.0)
        main_phases = m["open_store"] + m["resolve_nodes"] + m["power"]
        run = {
            "interpreter start": m["start"] - timed.started_at,
            "import": m["imported"] - m["start"],
            "store open": m["open_store"] + connect,
            "resolve nodes": max(m["resolve_nodes"] - connect, 0.0),
            "body": m["power"],
            "rest of main": m["main_end"] - m["imported"] - main_phases,
            "exit": timed.ended_at - m["main_end"],
            "wall": timed.wall,
        }
        # the workers' time: the driver call and the store calls around it, per node
        worker_total = sum(calls.get(k, (0, 0.0))[1] for k in ("power_state", *STORE_KINDS))
        for kind, _ in WORKER_KINDS:
            n, seconds = calls.get(kind, (0, 0.0))
            run[f"{kind} calls"] = n
            run[f"{kind} thread-s"] = seconds
            run[f"{kind} share"] = seconds / worker_total if worker_total else 0.0
        in_driver = calls.get("power_state", (0, 0.0))[1]
        accounted = sum(calls.get(k, (0, 0.0))[1] for k in DRIVER_KINDS)
        run["other share"] = (in_driver - accounted) / worker_total if worker_total else 0.0
        runs.append(run)
    med = {key: median(r[key] for r in runs) for key in runs[0]}
    shown = (*MAIN_PHASES, "wall")
    progress("  instrumented CLI (median): " + ", ".join(f"{k} {fmt_ms(med[k])}" for k in shown))
    progress(
        "  workers' time: "
        + ", ".join(f"{k} {med[f'{k} share'] * 100:.0f}%" for k, _ in WORKER_KINDS)
    )
    return med


PEN_CALLS = 32


def _pen_probe(work: Path, login: Login, endpoints: list[str]) -> tuple[float, float] | None:
    """ipmitool per-call wall, as installed and with a one-entry PEN registry (diagnostic).

    The second run bind-mounts a copy of the registry cut after its first entry over
    the real one inside a private mount namespace (``unshare -m``), so nothing outside
    that one shell sees it. (An empty file does not do: ipmitool then refuses to run.)
    Returns None when that is not possible (not root, no unshare).
    """
    if not PEN_FILE.exists() or os.geteuid() != 0:
        return None
    hosts = work / "pen-hosts"
    hosts.write_text("".join(f"{e.replace(':', ' ')}\n" for e in endpoints[:PEN_CALLS]))
    lines = PEN_FILE.read_text(errors="replace").splitlines(keepends=True)
    cut = lines.index("1\n") if "1\n" in lines else 19  # header and entry 0 (Reserved)
    small = work / "small-pen"
    small.write_text("".join(lines[:cut]))
    env = bench_env(IPMI_PASSWORD=login.password, BENCH_USER=login.username)
    loop_argv = ["bash", "-c", IPMITOOL_LOOP, "bash", str(hosts)]
    masked_argv = [
        "unshare",
        "-m",
        "bash",
        "-c",
        'mount --bind "$1" "$2" && shift 2 && exec "$@"',
        "bash",
        str(small),
        str(PEN_FILE),
        *loop_argv,
    ]
    result = []
    for argv in (loop_argv, masked_argv):
        timed = timed_run(argv, env=env)
        answers = timed.stdout.count("Chassis Power is")
        if timed.returncode != 0 or answers != PEN_CALLS:
            why = (timed.stderr.strip() or timed.stdout.strip())[-200:]
            progress(f"  (ipmitool PEN diagnostic skipped: {why})")
            return None
        result.append(timed.wall / PEN_CALLS)
    return result[0], result[1]


def _breakdown_lines(phases: dict, concurrency: int, peer_runs) -> list[str]:
    """The short table: where one ``power status --all`` process spends its wall time."""
    wall, body = phases["wall"], phases["body"]
    pp_med = median(t.wall for t, _ in peer_runs)
    pp_cpu = median(t.cpu for t, _ in peer_runs)
    lines = [
        "### Where the time goes",
        "",
        f"`metalseed power status --all --json` run {POWER_RUNS} times as `python -c "
        "CLI_BREAKDOWN` (bench/ipmi_power.py): `bootstrap.cli.main()` with timers around "
        "the store, the node listing, `actions.power` and, on the worker threads, the "
        "driver's login, command and logout and the store calls. Medians of each phase, "
        "so the shares need not add up to exactly 100%. The body runs "
        f"{concurrency} worker threads at once; the rows under it split its wall time in "
        "proportion to the thread-time each kind of call took (a thread waiting for the "
        "GIL inside a call counts for that call).",
        "",
        "| phase | median | share of the process |",
        "|---|---|---|",
    ]
    main_rows = [
        ("interpreter start-up (fork/exec to the first line)", phases["interpreter start"]),
        ("`import bootstrap.cli` (click, rich, cryptography, the store code)", phases["import"]),
        ("store open (SqliteStore, first connection, schema check)", phases["store open"]),
        ("listing the nodes (`resolve_nodes`)", phases["resolve nodes"]),
        (
            f"power status of {POWER_BMCS} BMCs (`actions.power`, concurrency {concurrency})",
            body,
        ),
    ]
    for label, value in main_rows:
        lines.append(f"| {label} | {fmt_ms(value)} | {value / wall * 100:.0f}% |")
    for kind, label in [*WORKER_KINDS, ("other", "the rest of the driver call (sessions, retry)")]:
        share = phases[f"{kind} share"]
        calls = f", {phases[f'{kind} calls']:.0f} calls" if kind != "other" else ""
        lines.append(
            f"| &nbsp;&nbsp;of which {label} ({share * 100:.0f}% of the workers' time"
            f"{calls}) | ~{fmt_ms(share * body)} | {share * body / wall * 100:.0f}% |"
        )
    for label, value in [
        ("the rest of `main()`: config, click, JSON output", phases["rest of main"]),
        ("interpreter exit", phases["exit"]),
        ("whole process", wall),
    ]:
        lines.append(f"| {label} | {fmt_ms(value)} | {value / wall * 100:.0f}% |")
    startup = phases["interpreter start"] + phases["import"]
    logins = phases["login share"] * body
    lines += [
        "",
        f"For comparison, ipmipower does the same {POWER_BMCS} logins, reads and logouts "
        f"in {fmt_ms(pp_med)} (median, {pp_cpu:.2f} CPU s) from one C process polling every "
        f"session at once. metalseed's start-up alone (interpreter and imports, "
        f"{fmt_ms(startup)}) is {startup / pp_med:.1f}x that, and its logins "
        f"(~{fmt_ms(logins)}) {logins / pp_med:.1f}x: every one is a fresh RMCP+ session "
        "set-up in Python on threads that share one GIL.",
        "",
        "### More detail",
        "",
    ]
    return lines


def _power_notes(*, runs, loop, loop_sim_cpu, peer_runs, startup, inproc, phases, pen_probe):
    ms_best, ms_med = best_median([t.wall for t, _ in runs])
    cli_cpu = median(t.cpu for t, _ in runs)
    sim_cpu = median(s for _, s in runs)
    budget = loop.wall / POWER_TARGET_SPEEDUP
    pp_best, pp_med = best_median([t.wall for t, _ in peer_runs])
    pp_cpu = median(t.cpu for t, _ in peer_runs)
    pp_sim_cpu = median(s for _, s in peer_runs)
    lines = _breakdown_lines(phases, inproc["cli_concurrency"], peer_runs)
    lines += [
        f"Start-up, whole processes (best / median of {STARTUP_RUNS}):",
        "",
        "| command | best | median |",
        "|---|---|---|",
    ]
    for label, (b, m) in startup.items():
        lines.append(f"| `{label}` | {fmt_ms(b)} | {fmt_ms(m)} |")

    lines += [
        "",
        f"The same work in one long-lived process ({DRIVER_REPEAT} passes each, the first "
        "included; client CPU from getrusage(2), simulator CPU from /proc/PID/stat over the "
        "same interval, medians):",
        "",
        "| in-process pass | best | median | client CPU | simulator CPU |",
        "|---|---|---|---|---|",
    ]
    for p in inproc["passes"]:
        b, m = best_median([r["wall"] for r in p["reps"]])
        c = median(r["client_cpu"] for r in p["reps"])
        sc = median(r["sim_cpu"] for r in p["reps"])
        lines.append(f"| `{p['what']}` | {fmt_ms(b)} | {fmt_ms(m)} | {c:.2f} s | {sc:.2f} s |")
    lines += [
        f"| whole CLI process (the main table) | {fmt_ms(ms_best)} | {fmt_ms(ms_med)} "
        f"| {cli_cpu:.2f} s | {sim_cpu:.2f} s |",
        f"| ipmipower, one process ({IPMIPOWER_RUNS} runs) | {fmt_ms(pp_best)} | "
        f"{fmt_ms(pp_med)} | {pp_cpu:.2f} s | {pp_sim_cpu:.2f} s |",
        f"| ipmitool loop, {POWER_BMCS} processes (1 run) | {fmt_s(loop.wall)} | "
        f"| {loop.cpu:.2f} s | {loop_sim_cpu:.2f} s |",
    ]

    imp = startup["python -c 'import bootstrap.cli, bootstrap.power.ipmi'"][1]
    body = phases["body"]
    driver_best = min(
        min(r["wall"] for r in p["reps"]) for p in inproc["passes"] if p["kind"] == "driver"
    )
    by_conc = sorted(
        (p["concurrency"], median(r["wall"] for r in p["reps"]))
        for p in inproc["passes"]
        if p["kind"] == "driver"
    )
    threads_verdict = (
        "More threads do not help" if by_conc[-1][1] > 0.9 * by_conc[0][1] else "More threads help"
    )
    speed = loop.wall / ms_best
    met = speed >= POWER_TARGET_SPEEDUP
    ncpu = os.cpu_count() or 1
    text = [
        "",
        f"**Target {'met' if met else 'missed'}:** the best run is {speed:.1f}x faster than "
        f"the ipmitool loop (median {loop.wall / ms_med:.1f}x); the target is >= "
        f"{POWER_TARGET_SPEEDUP:.0f}x, which means the whole CLI run within {fmt_ms(budget)} "
        f"(the loop's {fmt_s(loop.wall)} / {POWER_TARGET_SPEEDUP:.0f}).",
        "",
        f"- Start-up: `python -c 'import bootstrap.cli, bootstrap.power.ipmi'` takes "
        f"{fmt_ms(imp)}, {imp / budget * 100:.0f}% of that budget, before any packet is sent.",
        f"- The IPMI work itself takes {fmt_ms(body)} in the CLI (median) and "
        f"{fmt_ms(driver_best)} "
        f"at best as a bare driver pass in a warm process "
        f"({'more' if driver_best > budget else 'less'} than the whole budget). Each of the "
        f"{POWER_BMCS} reads pays a full RMCP+ session set-up (several round trips and the "
        "RAKP key exchange) and a close; a CLI process has no session to reuse.",
        f"- The client, not the simulator, is the bottleneck: a CLI run burns {cli_cpu:.2f} "
        f"CPU s in {fmt_s(ms_med)} of wall time ({cli_cpu / ms_med:.1f} of {ncpu} cores busy "
        "on average: pyghmi's session handling runs in Python, so its threads contend for "
        f"the GIL), while the simulator serving all {POWER_BMCS} BMCs uses {sim_cpu:.2f} "
        f"CPU s. {threads_verdict}: "
        + ", ".join(
            f"{fmt_ms(median(r['wall'] for r in p['reps']))} at concurrency {p['concurrency']}"
            for p in inproc["passes"]
            if p["kind"] == "driver"
        )
        + " (bare driver pass, medians).",
    ]
    per_call_cpu = loop.cpu / POWER_BMCS
    pen = ""
    if pen_probe is not None:
        as_is, masked = pen_probe
        pen = (
            f" Most of that is ipmitool's own start-up: it reads and parses the IANA "
            f"enterprise-numbers registry ({PEN_FILE}, "
            f"{PEN_FILE.stat().st_size / 2**20:.1f} MiB here) every time it starts. "
            f"Diagnostic, not the peer figure: {PEN_CALLS} calls took {fmt_ms(as_is)} each as "
            f"installed and {fmt_ms(masked)} each with the registry cut to its first entry "
            f"(bind-mounted over it in a private mount namespace), so the registry costs "
            f"about {(as_is - masked) / as_is * 100:.0f}% of each call; against that lighter "
            f"ipmitool the best ratio would be {masked * POWER_BMCS / ms_best:.1f}x."
        )
    text.append(
        f"- The peer: {fmt_ms(loop.wall / POWER_BMCS)} wall per ipmitool call, of which "
        f"{fmt_ms(per_call_cpu)} is CPU in the client processes (bash + ipmitool); the "
        f"simulator spent {loop_sim_cpu / POWER_BMCS * 1000:.2f} ms CPU per call.{pen}"
    )
    return "\n".join(lines + text)


BENCHMARKS = {"ipmi-power": power_status}
