"""DHCP benchmark: ISC perfdhcp against metalseed and dnsmasq, 1,000 simulated clients.

Per server, started fresh in the server namespace of a :mod:`bench.netboot` lab,
with perfdhcp in the client namespace:

1. *direct avalanche*: 1,000 clients at once that look like PXE ROMs on the
   segment (no giaddr, BROADCAST flag, answered by broadcast; perfdhcp
   templates and a broadcast shim, see :mod:`bench.perfdhcp`), each retrying
   with back-off until leased: the time until all 1,000 hold a lease.
2. *avalanche*: the same in perfdhcp's own mode, in which it poses as a relay
   agent on the segment (giaddr = its address, answers unicast to giaddr:67),
   with 1,000 other clients (``--scenario avalanche -R 1000``).
3. *ladder*: those 1,000 clients (now known to the server) at rising offered
   rates, ``-r RATE -p STEP``; each step sends for STEP seconds and waits 1 s
   for late answers. Rates climb by x1.41 from 100/s until a step drops a
   request (such a step is retried once, to tell saturation from a hiccup),
   then bisection steps narrow the edge. The *sustained rate* is the best
   step with 0 drops (leases/s = ACKs / STEP).
4. *overload*: one step at >= 8,000/s offered: throughput at saturation.

perfdhcp is never the limit if it sends what it is asked to: every step
records the share of the offered DISCOVERs it sent.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

from . import perfdhcp
from .common import MISSED, BenchError, Options, Row, Section, fmt_s, progress, verdict, workdir
from .netboot import (
    CLIENT_IP,
    IFACE,
    POOL,
    POOL_FIRST,
    POOL_LAST,
    POOL_SIZE,
    SEGMENT,
    SERVE_COMMAND,
    TURNS,
    Lab,
    Server,
    lab_line,
    listening,
    metalseed_missing,
    metalseed_serve,
    netboot_lab,
    profile,
    profile_summary,
    py_spy,
    require,
    run_server,
    state_samples,
    version_of,
)
from .perfdhcp import WAIT_US, Bench, Perf

CLIENTS = 1000
FIRST_RATE = 100
RATE_STEP = 1.41
MAX_RATE = 20000
OVERLOAD_RATE = 8000


@dataclasses.dataclass(frozen=True)
class Plan:
    step_seconds: int  # perfdhcp -p of each ladder step
    bisections: int

    @classmethod
    def for_run(cls, opts: Options) -> Plan:
        return cls(2, 0) if opts.quick else cls(3, 2)


@dataclasses.dataclass
class ServerRun:
    label: str
    direct: Perf  # the avalanche of PXE-like clients
    avalanche: Perf  # the avalanche in perfdhcp's relay mode
    ladder: list[Perf]
    overload: Perf
    states: Counter[str]  # scheduler state samples during the overload step
    profile: list[str] | None = None

    @property
    def sustained(self) -> Perf | None:
        clean = [p for p in self.ladder if p.drops == 0]
        return max(clean, key=lambda p: p.leases_per_s) if clean else None


#: starts a fresh server (empty leases) in the lab, as a context manager
Starter = Callable[[str], AbstractContextManager[Server]]


def measure(
    lab: Lab, start: Starter, plan: Plan, work: Path, *, profiled: bool = False
) -> ServerRun:
    """Direct avalanche on one fresh server; relayed avalanche, ladder, overload on another.

    ``profiled``: then one more overload step under py-spy, not counted.

    Two lifetimes, so each avalanche meets an empty pool: with 2,000 clients in 2,033
    addresses, dnsmasq offers one free address to several clients at once and NAKs all
    but one of their REQUESTs, which perfdhcp's avalanche never recovers from.
    """
    templates = perfdhcp.write_templates(work)
    with start("direct") as server:
        log = work / f"shim-{server.label}.log"
        with run_server(
            lab.client,
            "broadcast shim",
            perfdhcp.shim_argv(CLIENT_IP),
            log,
            lambda: "ready" in log.read_text(),
        ) as shim:
            progress(f"  {server.label}: {CLIENTS} PXE-like clients at once")
            direct = Bench(lab, server, CLIENTS, shim, templates).avalanche("direct")
    with start("relayed") as server:
        bench = Bench(lab, server, CLIENTS)
        progress(f"  {server.label}: {CLIENTS} clients at once, perfdhcp's relay mode")
        aval = bench.avalanche("relayed")
        ladder = _ladder(bench, plan)
        first_fail = next((p.rate for p in ladder if p.drops), None)
        rate = max(OVERLOAD_RATE, 2 * (first_fail or 0))
        args = ["-r", str(rate), "-p", str(plan.step_seconds)]
        with state_samples(server.pid) as states:
            overload = bench.perf(args, rate, plan.step_seconds)
        progress(f"    overload: {overload.line()}; thread states {dict(states)}")
        spy = None
        if profiled and py_spy():
            spy = work / "dhcp-profile.txt"
            with profile(server.pid, spy):
                extra = bench.perf(args, rate, plan.step_seconds)
            progress(f"    overload again under py-spy: {extra.line()}")
    return ServerRun(
        server.label,
        direct,
        aval,
        ladder,
        overload,
        states,
        profile_summary(spy) if spy is not None else None,
    )


def _ladder(bench: Bench, plan: Plan) -> list[Perf]:
    steps: list[Perf] = []
    rate = FIRST_RATE
    while rate <= MAX_RATE:
        steps.append(bench.step(rate, plan.step_seconds))
        if steps[-1].sent_share < 0.99:
            progress(f"    perfdhcp sent only {steps[-1].sent_share * 100:.0f}%: it is the limit")
            return steps
        if steps[-1].drops:
            break
        rate = int(round(rate * RATE_STEP, -1))
    good = max((p.rate for p in steps if not p.drops), default=0)
    bad = min((p.rate for p in steps if p.drops), default=None)
    for _ in range(plan.bisections):
        if bad is None or bad - good <= 20:
            break
        mid = int(round((good + bad) / 2, -1))
        steps.append(bench.step(mid, plan.step_seconds))
        if steps[-1].drops:
            bad = mid
        else:
            good = mid
    return steps


def dnsmasq_argv(work: Path) -> list[str]:
    return [
        "dnsmasq",
        "--no-daemon",
        "--port=0",
        "--conf-file=/dev/null",
        f"--interface={IFACE}",
        "--bind-interfaces",
        f"--dhcp-range={POOL_FIRST},{POOL_LAST},{SEGMENT.netmask},1h",
        f"--dhcp-lease-max={POOL_SIZE}",
        "--no-ping",
        "--quiet-dhcp",
        f"--dhcp-leasefile={work / 'dnsmasq.leases'}",
        f"--pid-file={work / 'dnsmasq.pid'}",
        f"--log-facility={work / 'dnsmasq.log'}",
    ]


def dhcp(opts: Options) -> Section:
    """perfdhcp, 1,000 clients: metalseed vs dnsmasq (leases/s, drops)."""
    plan = Plan.for_run(opts)
    require("perfdhcp", "dnsmasq", "ss")
    missing = metalseed_missing()
    with workdir("dhcp") as work, netboot_lab() as lab:

        @contextlib.contextmanager
        def dnsmasq(tag: str) -> Iterator[Server]:
            leases = work / "dnsmasq.leases"
            leases.unlink(missing_ok=True)
            ready = lambda: listening(lab.server, "udp", 67)  # noqa: E731
            with run_server(
                lab.server, "dnsmasq", dnsmasq_argv(work), work / f"dnsmasq-{tag}.out", ready
            ) as server:
                yield server
            if len(leases.read_text().splitlines()) != CLIENTS:
                raise BenchError(f"dnsmasq's lease file does not hold {CLIENTS} leases")

        def metalseed(tag: str) -> AbstractContextManager[Server]:
            return metalseed_serve(lab, work / f"metalseed-{tag}")

        progress(f"dhcp: dnsmasq in {lab.server.name}, perfdhcp in {lab.client.name}")
        peer = measure(lab, dnsmasq, plan, work)
        ours: ServerRun | None = None
        why = missing
        if missing is None:
            progress("dhcp: metalseed serve")
            try:
                ours = measure(lab, metalseed, plan, work, profiled=True)
            except BenchError as exc:
                why = str(exc)
        section = _section(plan, peer, ours, why)
    if ours is None:
        raise BenchError(f"metalseed: {why}", section=section)
    return section


# -- the report ---------------------------------------------------------------------------------


def _rate_cell(p: Perf | None) -> str:
    if p is None:
        return "no step without drops"
    return f"{p.leases_per_s:.0f} leases/s, 0 drops (offered {p.rate}/s)"


def _avalanche_cell(a: Perf) -> str:
    return f"{fmt_s(a.seconds)} ({CLIENTS / a.seconds:.0f} leases/s, {a.report.resent} resent)"


def _overload_cell(run: ServerRun) -> str:
    p = run.overload
    sent = p.do.sent
    return (
        f"{p.leases_per_s:.0f} leases/s at {p.rate}/s offered, "
        f"{p.drops} drops ({p.drops / max(sent, 1) * 100:.0f}% of {sent} DISCOVERs)"
    )


def _states_cell(run: ServerRun) -> str:
    total = sum(run.states.values()) or 1
    shares = [run.states[k] / total * 100 for k in "RDS"]
    return " / ".join(f"{x:.0f}%" for x in shares) + f" of {total} samples"


def _cpu_per_lease(run: ServerRun) -> str:
    perfs = [*run.ladder, run.overload]
    leases = sum(p.ra.received for p in perfs)
    cpu = sum(p.server_cpu for p in perfs)
    return f"{cpu / max(leases, 1) * 1e3:.2f} ms ({cpu:.1f} CPU s for {leases} leases)"


def _section(plan: Plan, peer: ServerRun, ours: ServerRun | None, why: str | None) -> Section:
    step = plan.step_seconds
    section = Section(f"DHCP: perfdhcp with {CLIENTS:,} clients, metalseed vs dnsmasq")
    dnsmasq_version = version_of(["dnsmasq", "--version"], lambda s: s.split("  ")[0])
    perf_version = version_of(["perfdhcp", "-v"], lambda s: s.replace("VERSION: ", ""))
    section.setup = [
        lab_line(TURNS),
        f"metalseed: {SERVE_COMMAND}, fresh state dir; pool {POOL} ({POOL_SIZE} addresses).",
        f"Peer: {dnsmasq_version}, `{' '.join(dnsmasq_argv(Path('TMP')))}` (same range; "
        "`--quiet-dhcp` so it does not log every packet, its fastest configuration; in "
        "`--no-daemon` mode dnsmasq writes no pid file, the harness has the PID from fork).",
        f"Load: ISC perfdhcp {perf_version} in its own mode, `perfdhcp -4 -l {IFACE} -R "
        f"{CLIENTS} -W {WAIT_US}` then `--scenario avalanche` or `-r RATE -p {step}`: it "
        "poses as a relay agent on the segment (giaddr = its address, hops 1; answers come "
        "unicast to giaddr:67).",
        f"Direct clients: what a PXE ROM on the segment sends (hops 0, giaddr 0.0.0.0, "
        f"BROADCAST flag; {CLIENTS} MACs apart from the relayed ones) from perfdhcp "
        f"templates, `... {' '.join(perfdhcp.template_args(Path('.')))} --scenario "
        "avalanche`. Servers answer those by broadcast to 255.255.255.255:68, which "
        "perfdhcp's socket does not receive; a shim in the client namespace (`python -m "
        "bench.perfdhcp shim`) hands each answer to it unchanged. Same packets, same shim "
        "for both servers.",
        f"Order per server: the direct avalanche ({CLIENTS} new clients); then, on a fresh "
        f"server again (empty leases), the relayed avalanche ({CLIENTS} new clients) and "
        "the rate ladder in relayed mode "
        f"from {FIRST_RATE}/s up by x{RATE_STEP} with those clients, each step {step} s of "
        "sending + 1 s for late answers, up to the first step with drops (retried once), "
        f"then {plan.bisections} bisection steps, then one overload step at >= "
        f"{OVERLOAD_RATE}/s. Leases/s = ACKs received / {step} s.",
    ]
    p_sus = peer.sustained
    o_sus = ours.sustained if ours else None
    if ours is None:
        ratio, result = "—", "—"
    elif o_sus is None or p_sus is None:
        ratio, result = "—", verdict(o_sus is not None)
    else:
        ratio = f"{o_sus.leases_per_s / p_sus.leases_per_s:.2f}x"
        result = verdict(o_sus.leases_per_s >= p_sus.leases_per_s)

    def cell(fn) -> str:
        return fn(ours) if ours is not None else "—"

    section.rows = [
        Row(
            "sustained leases/s with 0 drops (best ladder step)",
            ">= dnsmasq, 0 drops",
            f"could not run: {why}" if ours is None else _rate_cell(o_sus),
            _rate_cell(p_sus),
            ratio,
            result,
        ),
        Row(
            f"{CLIENTS:,} PXE-like clients at once (direct, broadcast answers): all leased in",
            "—",
            cell(lambda r: _avalanche_cell(r.direct)),
            _avalanche_cell(peer.direct),
            f"{peer.direct.seconds / ours.direct.seconds:.2f}x" if ours else "—",
            "—",
        ),
        Row(
            f"{CLIENTS:,} clients at once (perfdhcp's relay mode): all leased in",
            "—",
            cell(lambda r: _avalanche_cell(r.avalanche)),
            _avalanche_cell(peer.avalanche),
            f"{peer.avalanche.seconds / ours.avalanche.seconds:.2f}x" if ours else "—",
            "—",
        ),
        Row(
            "overload: leases/s and drops",
            "—",
            cell(_overload_cell),
            _overload_cell(peer),
            f"{ours.overload.leases_per_s / peer.overload.leases_per_s:.2f}x"
            if ours and peer.overload.leases_per_s
            else "—",
            "—",
        ),
        Row(
            "server during the overload step: running / disk wait / sleeping",
            "—",
            cell(_states_cell),
            _states_cell(peer),
            "—",
            "—",
        ),
        Row(
            "server CPU per lease (ladder and overload)",
            "—",
            cell(_cpu_per_lease),
            _cpu_per_lease(peer),
            "—",
            "—",
        ),
    ]
    section.notes = [_ladder_table(peer, ours)]
    if ours is not None:
        section.notes.append(_time_note(ours, peer, result == MISSED))
    return section


def _ladder_table(peer: ServerRun, ours: ServerRun | None) -> str:
    runs = [peer] + ([ours] if ours else [])
    shim = sum(r.direct.shim_cpu for r in runs)
    lines = [
        "### The rate ladder",
        "",
        "Every step, in the order run (server CPU from /proc/PID/stat over the step; "
        'perfdhcp\'s from wait4(2); "sent" is the share of the offered DISCOVERs perfdhcp '
        f'managed to send, so 100% means perfdhcp was not the limit; "others" is the CPU '
        "other processes on the machine used during the step, in cores: /proc/stat minus "
        f"server, perfdhcp and shim). The shim used {shim:.1f} CPU s over the whole "
        "benchmark.",
        "",
        "| server | offered/s | leases/s | drops (D-O + R-A) | avg delay D-O / R-A | sent "
        "| server CPU | perfdhcp CPU | others |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        for p in [*run.ladder, run.overload]:
            lines.append(
                f"| {run.label} | {p.rate} | {p.leases_per_s:.0f} | {p.do.drops} + {p.ra.drops} "
                f"| {p.do.avg_delay_ms:.1f} / {p.ra.avg_delay_ms:.1f} ms "
                f"| {p.sent_share * 100:.0f}% | {p.server_cpu:.2f} s | {p.perf_cpu:.2f} s "
                f"| {p.others_cpu / p.wall:.1f} |"
            )
    return "\n".join(lines)


def _time_note(ours: ServerRun, peer: ServerRun, missed: bool) -> str:
    o, p = ours.sustained, peer.sustained
    worst = o or ours.ladder[0]
    busy = worst.server_cpu / (worst.seconds + 1)
    text = [
        "### Where the DHCP time goes",
        "",
        f"- metalseed sustains {_rate_cell(o)}, dnsmasq {_rate_cell(p)}. At "
        f"{'its best clean step' if o else 'its first step'} metalseed's process used "
        f"{worst.server_cpu:.2f} CPU s over ~{worst.seconds + 1:.0f} s ({busy * 100:.0f}% of "
        f"one core; metalseed is one Python process). CPU per lease over the ladder and "
        f"overload: metalseed {_cpu_per_lease(ours)}, dnsmasq {_cpu_per_lease(peer)}.",
        f"- dnsmasq rewrites its lease file and waits for the disk on every lease change: "
        f"during the overload step it was in disk wait (state D) in {_share(peer, 'D')} of "
        f"the samples and running in {_share(peer, 'R')}; metalseed (leases in its SQLite "
        f"store) was in disk wait in {_share(ours, 'D')} and running in {_share(ours, 'R')}: "
        "its limit is CPU.",
        f"- Under overload ({ours.overload.rate}/s offered) metalseed completes "
        f"{ours.overload.leases_per_s:.0f} leases/s, {_of_sustained(ours)} of its sustained "
        f"rate; dnsmasq {peer.overload.leases_per_s:.0f} ({_of_sustained(peer)} of its own). "
        f"metalseed's OFFERs took {ours.overload.do.avg_delay_ms:.0f} ms on average, "
        f"dnsmasq's {peer.overload.do.avg_delay_ms:.0f} ms: metalseed still reads and sorts "
        "the whole flood of DISCOVERs before it drops the ones that waited too long, while "
        "dnsmasq leaves the excess to the kernel, whose full socket buffer drops it at no "
        "cost to the server.",
    ]
    if ours.profile:
        text += [
            "",
            f"Profile of `metalseed serve` during one more overload step at "
            f"{ours.overload.rate}/s (not counted in the table):",
            "",
            *ours.profile,
        ]
    elif missed and py_spy() is None:
        text += ["", "(py-spy not installed: `.venv/bin/pip install py-spy` for a profile.)"]
    return "\n".join(text)


def _share(run: ServerRun, state: str) -> str:
    return f"{run.states[state] / (sum(run.states.values()) or 1) * 100:.0f}%"


def _of_sustained(run: ServerRun) -> str:
    if run.sustained is None or not run.sustained.leases_per_s:
        return "n/a"
    return f"{run.overload.leases_per_s / run.sustained.leases_per_s * 100:.0f}%"


BENCHMARKS = {"netboot-dhcp": dhcp}
