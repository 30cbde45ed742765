"""TFTP benchmark: 20 clients fetching iPXE at once, metalseed vs tftpd-hpa.

Both servers serve the same directory: a copy of ``undionly.kpxe`` and
``ipxe.efi`` from ``/usr/lib/ipxe`` with the symlinks resolved (Debian's
``ipxe.efi`` there is a symlink to ``/boot/ipxe.efi``, which tftpd-hpa cannot
follow out of its ``-s`` chroot). metalseed is pointed at it with
``METALSEED_BOOT_IPXE_DIR``. metalseed listens on port 69, tftpd-hpa on 1069,
both at once; the rounds alternate between them.

The client is curl: one ``curl --parallel --parallel-immediate`` process in the
client namespace starts 20 transfers of the same file at once, asking for
blksize 1432 (what iPXE asks for); ``-w`` gives each transfer's size and time.
A round's aggregate throughput is 20 x size / the slowest transfer's time.
Each server is first checked: one fetch of each file, byte-compared, with the
negotiated block size read from ``curl -v``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import shutil
import statistics
from pathlib import Path

from .common import BenchError, Options, Row, Section, fmt_s, progress, timed_run, verdict, workdir
from .netboot import (
    IPXE_DIR,
    SERVE_COMMAND,
    SERVER_IP,
    SIDE_BY_SIDE,
    TFTP_PORT,
    Lab,
    Server,
    cpu_text,
    lab_line,
    listening,
    machine_cpu_seconds,
    mb_s,
    metalseed_missing,
    metalseed_serve,
    netboot_lab,
    paired_ratio,
    profile,
    profile_summary,
    py_spy,
    require,
    run_server,
    sha256_of,
    tail,
    version_of,
)

FILES = ("undionly.kpxe", "ipxe.efi")
CLIENTS = 20
BLKSIZE = 1432
TARGET = 1.0  # x tftpd-hpa's aggregate throughput
PEER_PORT = 1069
CURL_MAX_TIME = 120


@dataclasses.dataclass(frozen=True)
class Plan:
    rounds: int  # per file and server

    @classmethod
    def for_run(cls, opts: Options) -> Plan:
        return cls(rounds=3 if opts.quick else 9)


@dataclasses.dataclass
class Round:
    times: list[float]  # each transfer's time_total
    nbytes: int  # all transfers together
    server_cpu: float  # NaN when not measurable
    client_cpu: float
    others_cpu: float  # other processes on the machine over the round (NaN with tftpd-hpa)

    @property
    def wall(self) -> float:
        return max(self.times)

    @property
    def mb_s(self) -> float:
        return mb_s(self.nbytes, self.wall)


@dataclasses.dataclass
class FileRuns:
    name: str
    size: int
    rounds: list[Round] = dataclasses.field(default_factory=list)

    @property
    def median_round(self) -> Round:
        ordered = sorted(self.rounds, key=lambda r: r.mb_s)
        return ordered[len(ordered) // 2]

    @property
    def client_median(self) -> float:
        return statistics.median(t for r in self.rounds for t in r.times)


@dataclasses.dataclass
class Target:
    """One server under test and what was measured against it."""

    label: str
    server: Server
    port: int
    blksize: str = ""
    files: dict[str, FileRuns] = dataclasses.field(default_factory=dict)
    profile: list[str] | None = None

    def url(self, name: str) -> str:
        return f"tftp://{SERVER_IP}:{self.port}/{name}"


def _curl_base() -> list[str]:
    return ["curl", "--no-progress-meter", "--tftp-blksize", str(BLKSIZE)]


def check_fetch(lab: Lab, target: Target, path: Path, work: Path) -> str:
    """Fetch ``path.name`` once, compare it byte for byte; return the negotiated blksize."""
    out = work / f"check-{path.name}"
    url = target.url(path.name)
    argv = [*lab.client.prefix, *_curl_base(), "-v", "--max-time", "30", "-o", str(out), url]
    timed = timed_run(argv, timeout=60)
    if timed.returncode != 0:
        raise BenchError(
            f"{target.label}: curl {url} exited {timed.returncode}: "
            f"{timed.stderr.strip()[-500:]}; server log: {tail(target.server.log, 800)}"
        )
    if sha256_of(out) != sha256_of(path):
        raise BenchError(f"{target.label}: {path.name} fetched over TFTP differs from the file")
    out.unlink()
    m = re.search(r"blksize parsed from OACK \((\d+)\)", timed.stderr)
    return m.group(1) if m else "512 (no OACK)"


def fetch_round(lab: Lab, target: Target, name: str, size: int) -> Round:
    argv = [*lab.client.prefix, *_curl_base(), "--parallel", "--parallel-immediate"]
    argv += ["--parallel-max", str(CLIENTS), "--max-time", str(CURL_MAX_TIME)]
    argv += ["-w", "%{size_download} %{time_total} %{exitcode}\\n"]
    for _ in range(CLIENTS):
        argv += ["-o", "/dev/null", target.url(name)]
    before, machine = target.server.cpu_seconds(), machine_cpu_seconds()
    timed = timed_run(argv, timeout=CURL_MAX_TIME + 60)
    server_cpu = target.server.cpu_seconds() - before
    others = machine_cpu_seconds() - machine - server_cpu - timed.cpu
    rows = [line.split() for line in timed.stdout.splitlines() if line.strip()]
    bad = [r for r in rows if len(r) != 3 or r[2] != "0" or int(r[0]) != size]
    if timed.returncode != 0 or len(rows) != CLIENTS or bad:
        raise BenchError(
            f"{target.label}: {len(rows)} of {CLIENTS} transfers of {name} reported, "
            f"failed {bad[:3]} (size, time, curl exit); {timed.stderr.strip()[-300:]}"
        )
    times = [float(r[1]) for r in rows]
    return Round(times, sum(int(r[0]) for r in rows), server_cpu, timed.cpu, max(others, 0.0))


def measure(lab: Lab, targets: list[Target], plan: Plan, served: Path, work: Path) -> None:
    """Check every server, then alternate rounds between them, file by file."""
    for target in targets:
        sizes = {check_fetch(lab, target, served / n, work) for n in FILES}
        target.blksize = ", ".join(sorted(sizes))
    for name in FILES:
        size = (served / name).stat().st_size
        for target in targets:
            target.files[name] = FileRuns(name, size)
        for i in range(plan.rounds):
            for target in targets if i % 2 == 0 else targets[::-1]:
                r = fetch_round(lab, target, name, size)
                target.files[name].rounds.append(r)
                progress(
                    f"    {target.label} {name} x{CLIENTS}: {fmt_s(r.wall)}, "
                    f"{r.mb_s:.1f} MB/s, server CPU {cpu_text(r.server_cpu)}, "
                    f"curl CPU {r.client_cpu:.2f} s"
                )


def _profile_round(lab: Lab, target: Target, name: str, work: Path) -> list[str] | None:
    out = work / "tftp-profile.txt"
    with profile(target.server.pid, out):
        for _ in range(3):
            fetch_round(lab, target, name, target.files[name].size)
    return profile_summary(out)


def tftpd_argv(served: Path) -> list[str]:
    return ["in.tftpd", "-L", "-s", str(served), "-a", f"{SERVER_IP}:{PEER_PORT}"]


def tftp(opts: Options) -> Section:
    """20 concurrent TFTP clients fetch undionly.kpxe and ipxe.efi: metalseed vs tftpd-hpa."""
    plan = Plan.for_run(opts)
    require("in.tftpd", "curl", "ss")
    why = metalseed_missing()
    with workdir("tftp") as work, netboot_lab() as lab, contextlib.ExitStack() as stack:
        served = work / "ipxe"
        served.mkdir()
        for name in FILES:
            shutil.copyfile(IPXE_DIR / name, served / name)  # follows the symlink
            (served / name).chmod(0o644)
        served.chmod(0o755)  # tftpd-hpa drops to nobody inside its chroot
        progress(f"tftp: tftpd-hpa and metalseed in {lab.server.name}, curl in {lab.client.name}")
        peer_server = stack.enter_context(
            run_server(
                lab.server,
                "tftpd-hpa",
                tftpd_argv(served),
                work / "tftpd.log",
                lambda: listening(lab.server, "udp", PEER_PORT),
                cpu_accounted=False,
            )
        )
        peer = Target("tftpd-hpa", peer_server, PEER_PORT)
        ours: Target | None = None
        if why is None:
            try:
                server = stack.enter_context(
                    metalseed_serve(
                        lab, work / "metalseed-state", METALSEED_BOOT_IPXE_DIR=str(served)
                    )
                )
                ours = Target("metalseed", server, TFTP_PORT)
                measure(lab, [peer, ours], plan, served, work)
            except BenchError as exc:
                why, ours = str(exc), None
        if ours is None:
            measure(lab, [peer], plan, served, work)
        elif py_spy() and any(_ratio(ours, peer, n) < TARGET for n in FILES):
            slow = min(FILES, key=lambda n: _ratio(ours, peer, n))
            progress(f"tftp: profiling metalseed on {slow}")
            ours.profile = _profile_round(lab, ours, slow, work)
        section = _section(plan, peer, ours, why)
    if ours is None:
        raise BenchError(f"metalseed: {why}", section=section)
    return section


def _ratio(ours: Target, peer: Target, name: str) -> float:
    """Median of the per-pair throughput ratios (round i of each server ran back to back)."""
    return paired_ratio(
        [r.mb_s for r in ours.files[name].rounds], [r.mb_s for r in peer.files[name].rounds]
    )


def _cell(f: FileRuns) -> str:
    r = f.median_round
    return f"{fmt_s(r.wall)} ({r.mb_s:.1f} MB/s; client median {fmt_s(f.client_median)})"


def _section(plan: Plan, peer: Target, ours: Target | None, why: str | None) -> Section:
    section = Section(f"TFTP: {CLIENTS} clients fetching iPXE at once, metalseed vs tftpd-hpa")
    tftpd_version = version_of(["in.tftpd", "-V"], lambda s: s.split(",")[0])
    curl_version = version_of(["curl", "-V"], lambda s: " ".join(s.split()[:2]))
    sizes = ", ".join(f"`{f.name}` {f.size:,} bytes" for f in peer.files.values())
    blksizes = ", ".join(f"{t.label} {t.blksize}" for t in [peer] + ([ours] if ours else []))
    section.setup = [
        lab_line(SIDE_BY_SIDE),
        f"Files: {sizes}, copied from {IPXE_DIR} (symlinks resolved: tftpd-hpa cannot follow "
        "`ipxe.efi -> /boot/ipxe.efi` out of its chroot) into one directory both servers "
        "serve.",
        f"metalseed: {SERVE_COMMAND} with `METALSEED_BOOT_IPXE_DIR` set to that directory.",
        f"Peer: {tftpd_version}, `in.tftpd -L -s DIR -a {SERVER_IP}:{PEER_PORT}` (foreground, "
        "a process per transfer, as packaged).",
        f"Client: {curl_version}, one `curl --parallel --parallel-immediate --parallel-max "
        f"{CLIENTS} --tftp-blksize {BLKSIZE}` process with {CLIENTS} URLs of the same file "
        f"(blksize {BLKSIZE} is what iPXE asks for; negotiated, from `curl -v`: {blksizes}); "
        f"{plan.rounds} rounds per file and server. A round's time is its slowest transfer; "
        f"aggregate = {CLIENTS} x size / that time; each server's round with the median "
        "aggregate is shown, with the median of all transfers' own times. Ratio = the median "
        "of the per-pair ratios (each metalseed round against the tftpd-hpa round run next "
        "to it), which cancels most of the machine's background load.",
    ]
    for name in FILES:
        p = peer.files[name]
        o = ours.files[name] if ours else None
        ratio = _ratio(ours, peer, name) if ours else None
        section.rows.append(
            Row(
                f"{CLIENTS} clients fetch `{name}`: time until all have it (aggregate)",
                f">= {TARGET:.1f}x tftpd-hpa throughput",
                _cell(o) if o else f"could not run: {why}",
                _cell(p),
                f"{ratio:.2f}x" if ratio else "—",
                verdict(ratio >= TARGET) if ratio else "—",
            )
        )
    if ours is not None:
        section.rows.append(
            Row(
                "server CPU per MB served (all rounds)",
                "—",
                _cpu_per_mb(ours),
                _cpu_per_mb(peer),
                "—",
                "—",
            )  # fmt: skip
        )
        section.notes.append(_rounds_note(peer, ours))
        section.notes.append(
            "metalseed's server was busy "
            + ", ".join(
                f"{statistics.median(r.server_cpu / r.wall for r in ours.files[n].rounds):.2f} "
                f"cores during the `{n}` rounds"
                for n in FILES
            )
            + " (CPU over the round's time, medians). TFTP is lock-step: one block in flight "
            "per transfer, the next only after its ACK, so a transfer's speed is set by the "
            "per-block turnaround in the server."
        )
        if ours.profile is not None or any(r.result == "missed" for r in section.rows):
            section.notes.append(_miss_note(ours, peer))
    return section


def _cpu_per_mb(t: Target) -> str:
    cpu = sum(r.server_cpu for f in t.files.values() for r in f.rounds)
    mb = sum(r.nbytes for f in t.files.values() for r in f.rounds) / 1e6
    if math.isnan(cpu):
        return "not measurable (tftpd-hpa ignores SIGCHLD: its transfer processes' CPU is lost)"
    return f"{cpu / mb * 1e3:.1f} ms ({cpu:.2f} CPU s for {mb:.0f} MB)"


def _rounds_note(peer: Target, ours: Target) -> str:
    client = max(r.client_cpu for t in (peer, ours) for f in t.files.values() for r in f.rounds)
    lines = [
        "Every round's time in ms, pair by pair (the client, curl, used at most "
        f'{client:.2f} CPU s in any round; "others" is the CPU other processes on the '
        "machine used during metalseed's rounds, in cores: /proc/stat minus the server and "
        "curl; not measurable during tftpd-hpa's):",
        "",
        "| file | server | rounds |",
        "|---|---|---|",
    ]
    for name in FILES:
        for t in (peer, ours):
            times = " ".join(f"{r.wall * 1000:.0f}" for r in t.files[name].rounds)
            lines.append(f"| `{name}` | {t.label} | {times} |")
        others = " ".join(f"{r.others_cpu / r.wall:.1f}" for r in ours.files[name].rounds)
        lines.append(f"| `{name}` | others during metalseed's | {others} |")
    return "\n".join(lines)


def _miss_note(ours: Target, peer: Target) -> str:
    lines = ["### Where metalseed's TFTP time goes", ""]
    for name in FILES:
        o, p = ours.files[name].median_round, peer.files[name].median_round
        lines.append(
            f"- `{name}`: metalseed's median round took {fmt_s(o.wall)} and "
            f"{o.server_cpu:.2f} CPU s in the server ({o.server_cpu / o.wall * 100:.0f}% of "
            f"one core over the round); tftpd-hpa's took {fmt_s(p.wall)}."
        )
    if ours.profile:
        lines += ["", "Profile of `metalseed serve` during 3 more rounds of the file furthest "
                  "behind:", "", *ours.profile]  # fmt: skip
    elif py_spy() is None:
        lines += ["", "(py-spy not installed: `.venv/bin/pip install py-spy` for a profile.)"]
    return "\n".join(lines)


BENCHMARKS = {"netboot-tftp": tftp}
