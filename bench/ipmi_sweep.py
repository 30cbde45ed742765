"""IPMI benchmark: ``discover`` of a /22 holding 256 live simulated BMCs (wall time, peak RSS).

Runs against ``metalseed lab bmc --spec`` on 127.0.8.0/22; see :mod:`bench.ipmi`
for the shared pieces and the ``sweep-timing`` child-process helper.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
from pathlib import Path

from .common import (
    BenchError,
    Login,
    Options,
    Row,
    Section,
    Simulator,
    Timed,
    best_median,
    bmc_simulator,
    fmt_s,
    progress,
    python,
    timed_run,
    verdict,
    workdir,
    write_credentials,
)
from .ipmi import check_enrolled, count_nodes, discover, fmt_mb

SWEEP_NET = "127.0.8.0/22"
SWEEP_BMCS = 256
SWEEP_SEED = 22
SWEEP_PORT = 623
SWEEP_RUNS = 3
SWEEP_TARGET_WALL = 5.0
SWEEP_TARGET_RSS_MB = 300.0


# -- benchmark 2: discovery sweep of a /22 with 256 live BMCs ----------------------------


def _sweep_specs() -> list[dict]:
    hosts = list(ipaddress.IPv4Network(SWEEP_NET).hosts())
    chosen = sorted(random.Random(SWEEP_SEED).sample(hosts, SWEEP_BMCS), key=int)
    return [{"address": str(h), "port": SWEEP_PORT} for h in chosen]


def discovery_sweep(opts: Options) -> Section:
    """`discover` of a /22 holding 256 live simulated BMCs: wall time and peak RSS."""
    del opts  # the same runs in --quick mode
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
        timed, rows = discover(state, login, ranges)
        sim_cpu = sim.cpu_seconds() - sim_before
        check_enrolled(rows, sim, f"fresh discovery run {i + 1}")
        if timed.returncode != 0:
            raise BenchError(f"discover run {i + 1} exited {timed.returncode}")
        if (n := count_nodes(state)) != SWEEP_BMCS:
            raise BenchError(f"discover run {i + 1}: the store holds {n} nodes")
        fresh.append((timed, sim_cpu))
        progress(
            f"  fresh discover run {i + 1}: {fmt_s(timed.wall)}, "
            f"peak RSS {fmt_mb(timed.max_rss_kb)}, "
            f"{len(rows)}/{SWEEP_BMCS} enrolled (client CPU {timed.cpu:.2f} s, "
            f"simulator CPU {sim_cpu:.2f} s)"
        )
    again, again_rows = discover(state, login, ranges)
    check_enrolled(again_rows, sim, "re-discovery", states=("enrolled",))
    if again.returncode != 0 or (n := count_nodes(state)) != SWEEP_BMCS:
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
            f"{fmt_s(again.wall)}, peak RSS {fmt_mb(again.max_rss_kb)}, still {SWEEP_BMCS} nodes",
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


BENCHMARKS = {"ipmi-discovery": discovery_sweep}
