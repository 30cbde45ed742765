"""IPMI benchmarks: power status of 256 BMCs (vs an ipmitool loop), and a /22 discovery sweep.

Both run against ``metalseed lab bmc`` started as its own process on loopback
(127.0.5.x-127.0.6.x and 127.0.8.0/22), with a random password that lives only
in a 0600 file and in ipmitool's environment (``IPMI_PASSWORD`` with ``-E``).

``python -m bench.ipmi driver-timing ...`` and ``... sweep-timing ...`` are
helpers the benchmarks run as child processes to time metalseed's driver and
sweep in-process, without the CLI around them; ``CLI_PHASES`` (run with
``python -c``) times the phases of one real ``power status`` CLI run.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import random
import resource
import sys
import time
from pathlib import Path

from .common import (
    BenchError,
    Login,
    Row,
    Section,
    Simulator,
    Timed,
    bench_env,
    best_median,
    bmc_simulator,
    fmt_s,
    metalseed_argv,
    proc_cpu_seconds,
    progress,
    python,
    timed_run,
    verdict,
    workdir,
    write_credentials,
)

POWER_BMCS = 256
POWER_FIRST = "127.0.5.1"
POWER_PORT = 623
POWER_RUNS = 5
POWER_TARGET_SPEEDUP = 50.0
STARTUP_RUNS = 5
DRIVER_CONCURRENCY = (64, 128)  # 64 as asked; 128 is the CLI's default (bmc.concurrency)
DRIVER_REPEAT = 5

SWEEP_NET = "127.0.8.0/22"
SWEEP_BMCS = 256
SWEEP_SEED = 22
SWEEP_PORT = 623
SWEEP_RUNS = 3
SWEEP_TARGET_WALL = 5.0
SWEEP_TARGET_RSS_MB = 300.0


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def _mb(kb: int) -> str:
    return f"{kb / 1024:.0f} MB"


def _json_rows(timed: Timed, what: str) -> list[dict]:
    try:
        data = json.loads(timed.stdout)
    except ValueError:
        raise BenchError(f"{what} did not print JSON: {timed.stdout[:300]!r}") from None
    if not isinstance(data, list):
        raise BenchError(f"{what} printed {type(data).__name__}, not a JSON array")
    return data


def _discover(state_dir: Path, login: Login, ranges: list[str]) -> tuple[Timed, list[dict]]:
    argv = [*metalseed_argv(), "--state-dir", str(state_dir), "discover", *ranges]
    argv += ["--credentials", str(login.path), "--json"]
    timed = timed_run(argv)
    # discover exits 1 when a BMC failed to enroll; the row check below says which
    rows = _json_rows(timed, "metalseed discover")
    return timed, rows


def _check_enrolled(rows: list[dict], sim: Simulator, what: str, states=("enrolled",)) -> None:
    """Every BMC of the simulator answered, was enrolled, under the GUID it serves."""
    want = {b["bmc"]: b["guid"] for b in sim.manifest["bmcs"]}
    got = {r["bmc"]: r for r in rows}
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    failed = [r for r in rows if r.get("error") or r.get("state") not in states]
    wrong_guid = [b for b, g in want.items() if b in got and got[b].get("guid") != g]
    if missing or extra or failed or wrong_guid or len(rows) != len(want):
        failures = [(r["bmc"], r.get("state"), r.get("error")) for r in failed[:5]]
        raise BenchError(
            f"{what}: {len(got)} of {len(want)} BMCs found; missing {missing[:5]}, "
            f"unexpected {extra[:5]}, failed {failures}, wrong GUID {wrong_guid[:5]}"
        )


def _count_nodes(state_dir: Path) -> int:
    argv = [*metalseed_argv(), "--state-dir", str(state_dir), "nodes", "list", "--json"]
    return len(_json_rows(timed_run(argv).check("metalseed nodes list"), "nodes list"))


def _covering_range(endpoints: list[str]) -> str:
    """``FIRST-LAST:PORT`` over consecutive addresses (a CIDR would skip .255 and .0)."""
    hosts = sorted((ipaddress.IPv4Address(e.rsplit(":", 1)[0]) for e in endpoints), key=int)
    port = endpoints[0].rsplit(":", 1)[1]
    return f"{hosts[0]}-{hosts[-1]}:{port}"


def _startup(label: str, argv: list[str]) -> tuple[float, float]:
    runs = [timed_run(argv).check(label).wall for _ in range(STARTUP_RUNS)]
    best, med = best_median(runs)
    progress(f"  {label}: best {_ms(best)}, median {_ms(med)}")
    return best, med


# -- benchmark 1: power status of 256 BMCs vs an ipmitool loop ----------------------------


IPMITOOL_LOOP = r"""
while read -r host port; do
  printf '%s:%s ' "$host" "$port"
  ipmitool -I lanplus -H "$host" -p "$port" -U "$BENCH_USER" -E power status 2>&1
done < "$1"
"""


def power_status() -> Section:
    """`power status --all` of 256 simulated BMCs vs a sequential ipmitool loop."""
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
    enroll, rows = _discover(state, login, ranges)
    _check_enrolled(rows, sim, "enrollment")
    if (n := _count_nodes(state)) != POWER_BMCS:
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
        out = _json_rows(timed, "metalseed power status")
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

    # (b) the peer: a shell loop of ipmitool, one process and one session per BMC
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
    progress(f"  ipmitool loop: {fmt_s(loop.wall)} ({_ms(loop.wall / POWER_BMCS)} per call)")

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
    phases = _cli_phase_runs(work, state)
    pen_probe = _pen_probe(work, login, sim.endpoints)
    if pen_probe:
        progress(
            f"  ipmitool per call: {_ms(pen_probe[0])} as installed, "
            f"{_ms(pen_probe[1])} with the PEN registry masked"
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
        "Peer: a sequential bash loop of `ipmitool -I lanplus -H ADDR -p 623 -U admin -E "
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
            f"time per BMC (wall / {POWER_BMCS})",
            "—",
            f"{_ms(ms_med / POWER_BMCS)} (median run)",
            f"{_ms(per_call)} per ipmitool call",
            f"{per_call / (ms_med / POWER_BMCS):.1f}x",
            "—",
        ),
        Row(
            "rows correct (256 rows, no errors, agrees with ipmitool)",
            "all",
            f"{POWER_BMCS}/{POWER_BMCS} in each of {POWER_RUNS} runs",
            f"{len(seen)}/{POWER_BMCS}",
            "—",
            "pass",
        ),
    ]
    section.notes = [
        _power_notes(
            runs=runs,
            loop=loop,
            loop_sim_cpu=loop_sim_cpu,
            startup=startup,
            inproc=inproc,
            phases=phases,
            pen_probe=pen_probe,
        )
    ]
    return section


def _median(values) -> float:
    return best_median(list(values))[1]


PEN_FILE = Path("/usr/share/misc/enterprise-numbers.txt")


#: ``metalseed power status --all --json`` through ``main()`` with phase timers, run as
#: ``python -c CLI_PHASES STATE_DIR OUT``: nothing but ``time`` and ``sys`` is imported
#: before ``bootstrap.cli``. The CLI's JSON goes to stdout; the marks (time.time()) to OUT.
CLI_PHASES = """
import time
t_start = time.time()
import sys
state_dir, out = sys.argv[1], sys.argv[2]
import bootstrap.cli as cli
from bootstrap import actions
marks = {"start": t_start, "imported": time.time()}

def timed(name, fn):
    def wrapper(*a, **kw):
        t0 = time.time()
        try:
            return fn(*a, **kw)
        finally:
            marks[name] = marks.get(name, 0.0) + time.time() - t0
    return wrapper

actions.power_driver = timed("driver", actions.power_driver)
actions.power = timed("body", actions.power)
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
    json.dump(marks, fh)
sys.exit(code)
"""


def _cli_phase_runs(work: Path, state: Path) -> dict[str, float]:
    """Median phases of ``power status --all --json`` run through an instrumented ``main()``."""
    out = work / "phases.json"
    runs = []
    for i in range(POWER_RUNS):
        timed = timed_run([python(), "-c", CLI_PHASES, str(state), str(out)])
        rows = _json_rows(timed, "instrumented power status")
        if timed.returncode != 0 or len(rows) != POWER_BMCS or any(r["error"] for r in rows):
            raise BenchError(f"instrumented power status run {i + 1} failed: {timed.stderr}")
        m = json.loads(out.read_text())
        runs.append(
            {
                "interpreter start": m["start"] - timed.started_at,
                "import": m["imported"] - m["start"],
                "driver": m["driver"],
                "body": m["body"],
                "rest of main": m["main_end"] - m["imported"] - m["driver"] - m["body"],
                "exit": timed.ended_at - m["main_end"],
                "wall": timed.wall,
            }
        )
    phases = {key: _median(r[key] for r in runs) for key in runs[0]}
    progress(
        "  instrumented CLI (median): " + ", ".join(f"{k} {_ms(v)}" for k, v in phases.items())
    )
    return phases


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


def _power_notes(*, runs, loop, loop_sim_cpu, startup, inproc, phases, pen_probe) -> str:
    ms_best, ms_med = best_median([t.wall for t, _ in runs])
    cli_cpu = _median(t.cpu for t, _ in runs)
    sim_cpu = _median(s for _, s in runs)
    budget = loop.wall / POWER_TARGET_SPEEDUP
    lines = [
        "### Where metalseed's time goes",
        "",
        f"Start-up, whole processes (best / median of {STARTUP_RUNS}):",
        "",
        "| command | best | median |",
        "|---|---|---|",
    ]
    for label, (b, m) in startup.items():
        lines.append(f"| `{label}` | {_ms(b)} | {_ms(m)} |")

    # phases of one CLI run, measured inside the process
    lines += [
        "",
        f"Phases of `metalseed power status --all --json`, run {POWER_RUNS} times as "
        "`python -c CLI_PHASES` (bench/ipmi.py): `bootstrap.cli.main()` with timers around "
        "`actions.power_driver` and `actions.power`; medians of each phase, so the shares "
        "need not add up to exactly 100%:",
        "",
        "| phase | median | share |",
        "|---|---|---|",
    ]
    wall = phases["wall"]
    for label, value in [
        ("interpreter start-up (fork/exec to the first line)", phases["interpreter start"]),
        (
            "`import bootstrap.cli` (click, rich, asyncio, cryptography, the store)",
            phases["import"],
        ),
        ("`actions.power_driver()`: imports pyghmi, builds the driver", phases["driver"]),
        (
            f"`actions.power(...)`: {POWER_BMCS} x (RMCP+ session set-up, Get Chassis Status, "
            f"close) at concurrency {inproc['cli_concurrency']}, a store write per node",
            phases["body"],
        ),
        (
            "the rest of `main()`: config, store, resolving the nodes, JSON output",
            phases["rest of main"],
        ),
        ("interpreter exit", phases["exit"]),
        ("whole process", wall),
    ]:
        lines.append(f"| {label} | {_ms(value)} | {value / wall * 100:.0f}% |")

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
        c = _median(r["client_cpu"] for r in p["reps"])
        sc = _median(r["sim_cpu"] for r in p["reps"])
        lines.append(f"| `{p['what']}` | {_ms(b)} | {_ms(m)} | {c:.2f} s | {sc:.2f} s |")
    lines += [
        f"| whole CLI process (the main table) | {_ms(ms_best)} | {_ms(ms_med)} "
        f"| {cli_cpu:.2f} s | {sim_cpu:.2f} s |",
        f"| ipmitool loop, {POWER_BMCS} processes (1 run) | {fmt_s(loop.wall)} | "
        f"| {loop.cpu:.2f} s | {loop_sim_cpu:.2f} s |",
    ]

    imp = startup["python -c 'import bootstrap.cli, bootstrap.power.ipmi'"][1]
    body = phases["body"]
    driver_best = min(
        min(r["wall"] for r in p["reps"]) for p in inproc["passes"] if p["kind"] == "driver"
    )
    by_conc = sorted(
        (p["concurrency"], _median(r["wall"] for r in p["reps"]))
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
        f"{POWER_TARGET_SPEEDUP:.0f}x, which means the whole CLI run within {_ms(budget)} "
        f"(the loop's {fmt_s(loop.wall)} / {POWER_TARGET_SPEEDUP:.0f}).",
        "",
        f"- Start-up: `python -c 'import bootstrap.cli, bootstrap.power.ipmi'` takes "
        f"{_ms(imp)}, {imp / budget * 100:.0f}% of that budget, before any packet is sent.",
        f"- The IPMI work itself takes {_ms(body)} in the CLI (median) and {_ms(driver_best)} "
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
            f"{_ms(_median(r['wall'] for r in p['reps']))} at concurrency {p['concurrency']}"
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
            f"Diagnostic, not the peer figure: {PEN_CALLS} calls took {_ms(as_is)} each as "
            f"installed and {_ms(masked)} each with the registry cut to its first entry "
            f"(bind-mounted over it in a private mount namespace), so the registry costs "
            f"about {(as_is - masked) / as_is * 100:.0f}% of each call; against that lighter "
            f"ipmitool the best ratio would be {masked * POWER_BMCS / ms_best:.1f}x."
        )
    text.append(
        f"- The peer: {_ms(loop.wall / POWER_BMCS)} wall per ipmitool call, of which "
        f"{_ms(per_call_cpu)} is CPU in the client processes (bash + ipmitool); the "
        f"simulator spent {loop_sim_cpu / POWER_BMCS * 1000:.2f} ms CPU per call.{pen}"
    )
    return "\n".join(lines + text)


# -- benchmark 2: discovery sweep of a /22 with 256 live BMCs ----------------------------


def _sweep_specs() -> list[dict]:
    hosts = list(ipaddress.IPv4Network(SWEEP_NET).hosts())
    chosen = sorted(random.Random(SWEEP_SEED).sample(hosts, SWEEP_BMCS), key=int)
    return [{"address": str(h), "port": SWEEP_PORT} for h in chosen]


def discovery_sweep() -> Section:
    """`discover` of a /22 holding 256 live simulated BMCs: wall time and peak RSS."""
    with workdir("sweep") as work:
        login = write_credentials(work)
        spec = work / "bmc-spec.json"
        spec.write_text(json.dumps({"bmcs": _sweep_specs()}, indent=1))
        progress(f"discovery: starting {SWEEP_BMCS} BMCs at seeded addresses in {SWEEP_NET}")
        with bmc_simulator(work, login, "--spec", str(spec)) as sim:
            if len(sim.endpoints) != SWEEP_BMCS:
                raise BenchError(f"simulator serves {len(sim.endpoints)} BMCs, not {SWEEP_BMCS}")
            return _discovery_sweep(work, login, sim)


def _discovery_sweep(work: Path, login: Login, sim: Simulator) -> Section:
    ranges = [f"{SWEEP_NET}:{SWEEP_PORT}"]
    net = ipaddress.IPv4Network(SWEEP_NET)
    fresh: list[tuple[Timed, float]] = []
    state = work / "state-0"
    for i in range(SWEEP_RUNS):
        state = work / f"state-{i}"
        sim_before = sim.cpu_seconds()
        timed, rows = _discover(state, login, ranges)
        sim_cpu = sim.cpu_seconds() - sim_before
        _check_enrolled(rows, sim, f"fresh discovery run {i + 1}")
        if timed.returncode != 0:
            raise BenchError(f"discover run {i + 1} exited {timed.returncode}")
        if (n := _count_nodes(state)) != SWEEP_BMCS:
            raise BenchError(f"discover run {i + 1}: the store holds {n} nodes")
        fresh.append((timed, sim_cpu))
        progress(
            f"  fresh discover run {i + 1}: {fmt_s(timed.wall)}, peak RSS {_mb(timed.max_rss_kb)}, "
            f"{len(rows)}/{SWEEP_BMCS} enrolled (client CPU {timed.cpu:.2f} s, "
            f"simulator CPU {sim_cpu:.2f} s)"
        )
    again, again_rows = _discover(state, login, ranges)
    _check_enrolled(again_rows, sim, "re-discovery", states=("enrolled",))
    if again.returncode != 0 or (n := _count_nodes(state)) != SWEEP_BMCS:
        raise BenchError(f"re-discovery: exit {again.returncode}, store holds {n} nodes")
    progress(f"  re-discovery on the enrolled state dir: {fmt_s(again.wall)}")

    progress("discovery: in-process sweep alone (presence probes, no logins)")
    sweep_child = timed_run([python(), "-m", "bench.ipmi", "sweep-timing", *ranges]).check(
        "sweep timing"
    )
    sweep = json.loads(sweep_child.stdout)
    if sweep["found"] != SWEEP_BMCS:
        raise BenchError(f"sweep alone found {sweep['found']} of {SWEEP_BMCS} BMCs")
    progress(f"  sweep of {sweep['probed']} addresses: {fmt_s(sweep['seconds'])}")

    walls = [t.wall for t, _ in fresh]
    best, med = best_median(walls)
    rss_kb = max(t.max_rss_kb for t, _ in fresh)
    rss_mb = rss_kb / 1024
    section = Section(f"Discovery sweep of a /22 with {SWEEP_BMCS} live BMCs")
    section.setup = [
        f"Simulator: `metalseed lab bmc --spec FILE` with {SWEEP_BMCS} BMCs at "
        f"`random.Random({SWEEP_SEED}).sample()` host addresses of {SWEEP_NET} "
        f"({sim.endpoints[0]} .. {sim.endpoints[-1]}), port {SWEEP_PORT}; "
        f"{net.num_addresses - 2 - SWEEP_BMCS} host addresses stay silent.",
        f"Command: `metalseed --state-dir FRESH discover {' '.join(ranges)} --credentials F "
        f"--json`, {SWEEP_RUNS} runs, each with a new state dir; wall time and peak RSS of "
        "the process from wait4(2). Every run checked: the JSON and the store hold exactly "
        "the simulator's BMCs, each `enrolled` under the GUID it serves.",
        "Peer: none measured (no stock tool sweeps and enrolls BMCs).",
    ]
    section.rows = [
        Row(
            f"fresh discovery, best of {SWEEP_RUNS}",
            f"<= {SWEEP_TARGET_WALL:.0f} s wall on {os.cpu_count()} cores",
            fmt_s(best),
            "—",
            "—",
            verdict(best <= SWEEP_TARGET_WALL),
        ),
        Row(
            f"fresh discovery, median of {SWEEP_RUNS}",
            f"<= {SWEEP_TARGET_WALL:.0f} s wall on {os.cpu_count()} cores",
            fmt_s(med),
            "—",
            "—",
            verdict(med <= SWEEP_TARGET_WALL),
        ),
        Row(
            f"peak RSS, worst of {SWEEP_RUNS}",
            f"<= {SWEEP_TARGET_RSS_MB:.0f} MB",
            f"{rss_mb:.0f} MB",
            "—",
            "—",
            verdict(rss_mb <= SWEEP_TARGET_RSS_MB),
        ),
        Row(
            "BMCs found and enrolled",
            f"{SWEEP_BMCS}/{SWEEP_BMCS}",
            f"{SWEEP_BMCS}/{SWEEP_BMCS} in each run",
            "—",
            "—",
            "pass",
        ),
        Row(
            "re-discovery on the enrolled state dir (idempotent)",
            "—",
            f"{fmt_s(again.wall)}, peak RSS {_mb(again.max_rss_kb)}, still {SWEEP_BMCS} nodes",
            "—",
            "—",
            "—",
        ),
    ]
    cpu = sorted(t.cpu for t, _ in fresh)[len(fresh) // 2]
    sim_cpu = sorted(s for _, s in fresh)[len(fresh) // 2]
    section.notes = [
        "### Where discovery's time goes\n\n"
        f"The presence sweep alone (`bootstrap.discovery.sweep.sweep` in a fresh process, "
        f"default settings: probe_timeout {sweep['timeout']} s, probe_rounds "
        f"{sweep['rounds']}, probe_window {sweep['window']}) took "
        f"{fmt_s(sweep['seconds'])} for {sweep['probed']} "
        f"addresses and found {sweep['found']} BMCs: {sweep['seconds'] / med * 100:.0f}% of "
        "the median fresh run. The silent addresses never answer, so the sweep lasts until "
        "its last round's timeout expires; its length follows the `discovery.probe_timeout` "
        "and `probe_rounds` settings, not the machine's speed. The rest of a fresh run "
        f"(median {fmt_s(med)}) is start-up and the authenticated stage: per BMC one "
        "RMCP+ session that identifies it (device ID, system GUID, channel, MAC, power, "
        "FRU), then its node, credential and state transition in the store. Median CPU per "
        f"fresh run: the CLI {cpu:.2f} s, the "
        f"simulator {sim_cpu:.2f} s."
    ]
    return section


BENCHMARKS = {
    "ipmi-power": power_status,
    "ipmi-discovery": discovery_sweep,
}


# -- child-process helpers ------------------------------------------------------------------


def _driver_timing(args: argparse.Namespace) -> None:
    """Time 256 power-status reads in-process: the bare driver, then the command body."""
    started = time.perf_counter()
    from bootstrap import actions
    from bootstrap import config as configmod
    from bootstrap.parallel import run_all
    from bootstrap.power.base import BmcTarget

    import_seconds = time.perf_counter() - started
    config = configmod.load(flags={"state_dir": Path(args.state_dir)})
    store = actions.open_store(config)
    driver = actions.power_driver(config)
    nodes = actions.resolve_nodes(store, [], True)
    targets = [BmcTarget(n.bmc, store.get_credential(n.id), node=n.id) for n in nodes]

    def measure(fn) -> dict:
        sim_before = proc_cpu_seconds(args.sim_pid)
        self_before = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        errors, rows = fn()
        wall = time.perf_counter() - t0
        self_after = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "wall": wall,
            "client_cpu": (self_after.ru_utime - self_before.ru_utime)
            + (self_after.ru_stime - self_before.ru_stime),
            "sim_cpu": proc_cpu_seconds(args.sim_pid) - sim_before,
            "errors": errors,
            "rows": rows,
        }

    def driver_pass(conc: int):
        outcomes = run_all(driver.power_state, targets, concurrency=conc)
        return sum(1 for o in outcomes if not o.ok), len(outcomes)

    def actions_pass(conc: int):
        outcomes = actions.power(store, driver, nodes, "status", concurrency=conc)
        return sum(1 for o in outcomes if o.error), len(outcomes)

    passes = []
    plan = [("driver", c, driver_pass) for c in args.concurrency]
    plan.append(("actions", config.bmc.concurrency, actions_pass))
    for kind, conc, fn in plan:
        reps = [measure(lambda fn=fn, conc=conc: fn(conc)) for _ in range(args.repeat)]
        what = (
            f"run_all(driver.power_state, {len(targets)} targets, concurrency={conc})"
            if kind == "driver"
            else f'actions.power(store, driver, {len(nodes)} nodes, "status", concurrency={conc})'
        )
        passes.append(
            {
                "kind": kind,
                "what": what,
                "concurrency": conc,
                "rows": min(r["rows"] for r in reps),
                "reps": reps,
            }
        )
    json.dump(
        {
            "import_seconds": import_seconds,
            "cli_concurrency": config.bmc.concurrency,
            "passes": passes,
        },
        sys.stdout,
    )


def _sweep_timing(args: argparse.Namespace) -> None:
    from bootstrap import config as configmod
    from bootstrap.discovery.ranges import parse_ranges
    from bootstrap.discovery.sweep import sweep

    config = configmod.load()
    targets = parse_ranges(args.ranges, config.bmc.port)
    d = config.discovery
    result = sweep(targets, timeout=d.probe_timeout, rounds=d.probe_rounds, window=d.probe_window)
    json.dump(
        {
            "seconds": result.seconds,
            "probed": result.probed,
            "found": len(result.found),
            "rounds": d.probe_rounds,
            "timeout": d.probe_timeout,
            "window": d.probe_window,
        },
        sys.stdout,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ipmi")
    sub = parser.add_subparsers(dest="helper", required=True)
    dt = sub.add_parser("driver-timing", help="time run_all(driver.power_state) in-process")
    dt.add_argument("--state-dir", required=True, help="a state dir with the BMCs enrolled")
    dt.add_argument("--sim-pid", type=int, required=True)
    dt.add_argument("--concurrency", type=int, action="append", required=True)
    dt.add_argument("--repeat", type=int, default=5)
    st = sub.add_parser("sweep-timing", help="time the presence sweep alone, in-process")
    st.add_argument("ranges", nargs="+")
    args = parser.parse_args(argv)
    helpers = {
        "driver-timing": _driver_timing,
        "sweep-timing": _sweep_timing,
    }
    helpers[args.helper](args)


if __name__ == "__main__":
    main()
