"""IPMI benchmark: ``power status --all`` of 256 simulated BMCs vs a sequential ipmitool loop.

Runs against ``metalseed lab bmc`` on 127.0.5.x-127.0.6.x; see :mod:`bench.ipmi`
for the shared pieces and the child-process helpers it times in-process with.
"""

from __future__ import annotations

import ipaddress
import json
import os
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
    progress,
    python,
    timed_run,
    verdict,
    workdir,
    write_credentials,
)
from .ipmi import (
    CLI_PHASES,
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
DRIVER_CONCURRENCY = (64, 128)  # 64 as asked; 128 is the CLI's default (bmc.concurrency)
DRIVER_REPEAT = 5


def _covering_range(endpoints: list[str]) -> str:
    """``FIRST-LAST:PORT`` over consecutive addresses (a CIDR would skip .255 and .0)."""
    hosts = sorted((ipaddress.IPv4Address(e.rsplit(":", 1)[0]) for e in endpoints), key=int)
    port = endpoints[0].rsplit(":", 1)[1]
    return f"{hosts[0]}-{hosts[-1]}:{port}"


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
    """`power status --all` of 256 simulated BMCs vs a sequential ipmitool loop."""
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
    phases = _cli_phase_runs(work, state)
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
            f"{fmt_ms(ms_med / POWER_BMCS)} (median run)",
            f"{fmt_ms(per_call)} per ipmitool call",
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


PEN_FILE = Path("/usr/share/misc/enterprise-numbers.txt")


def _cli_phase_runs(work: Path, state: Path) -> dict[str, float]:
    """Median phases of ``power status --all --json`` run through an instrumented ``main()``."""
    out = work / "phases.json"
    runs = []
    for i in range(POWER_RUNS):
        timed = timed_run([python(), "-c", CLI_PHASES, str(state), str(out)])
        rows = json_rows(timed, "instrumented power status")
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
    phases = {key: median(r[key] for r in runs) for key in runs[0]}
    progress(
        "  instrumented CLI (median): " + ", ".join(f"{k} {fmt_ms(v)}" for k, v in phases.items())
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
    cli_cpu = median(t.cpu for t, _ in runs)
    sim_cpu = median(s for _, s in runs)
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
        lines.append(f"| `{label}` | {fmt_ms(b)} | {fmt_ms(m)} |")

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
        lines.append(f"| {label} | {fmt_ms(value)} | {value / wall * 100:.0f}% |")

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
